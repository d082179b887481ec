"""tools/convert_hf.py and tools/logits.py: HF -> ours -> HF through the CLIs,
training from an imported checkpoint, and one-message errors."""

import dataclasses
import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from posttrain_jax import cli
from posttrain_jax.models import params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(REPO, "tools", "convert_hf.py")
LOGITS = os.path.join(REPO, "tools", "logits.py")
TINY = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=4)


def _tool(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(tool, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, tool, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def hf_model(path, seed=0, dtype=None, **overrides):
  torch.manual_seed(seed)
  model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
      attn_implementation="eager", **{**TINY, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(str(path), max_shard_size="40KB")
  (path / "tokenizer.model").write_bytes(b"not a real tokenizer")  # copied through
  return model


def load_tensors(directory):
  out = {}
  for name in glob.glob(os.path.join(directory, "*.safetensors")):
    with safe_open(name, "numpy") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def assert_bit_exact(a, b):
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    assert a[key].tobytes() == b[key].tobytes(), key


def logits_of(model, tokens):
  with torch.no_grad():
    return model.float()(torch.tensor(tokens).long()).logits.numpy()


def test_import_export_round_trip_and_logits_tool(tmp_path):
  hf_dir, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
  model = hf_model(hf_dir, dtype=torch.bfloat16)
  assert os.path.isfile(hf_dir / "model.safetensors.index.json")  # sharded
  imported = _run(CONVERT, "import", "--hf_dir", hf_dir, "--out_dir", ours,
                  "--pad_vocab_to", 256, "--scan_layers")
  assert imported.returncode == 0, imported.stderr
  assert "vocab 160 padded to 256" in imported.stdout
  assert "initial_checkpoint" in imported.stdout
  cfg = params_checkpoint.read_model_gin(str(ours / "model.gin"))
  assert (cfg.vocab_size, cfg.scan_layers, cfg.dtype, cfg.param_dtype) == (
      256, True, "bfloat16", "float32")
  assert (ours / "hf_files" / "tokenizer.model").is_file()

  tokens = np.random.default_rng(1).integers(0, 160, (2, 11)).astype(np.int32)
  np.save(tmp_path / "tokens.npy", tokens)
  checked = _run(LOGITS, "--checkpoint_dir", ours, "--tokens_npy", tmp_path / "tokens.npy",
                 "--out_npy", tmp_path / "logits.npy")
  assert checked.returncode == 0, checked.stderr
  # reference: the checkpoint as a user loads it in float32 (a bf16 model cast
  # with .float() would keep its bf16-rounded sqrt(d) and RoPE buffers)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(hf_dir), dtype=torch.float32, attn_implementation="eager")
  ref = logits_of(model, tokens)
  got = np.load(tmp_path / "logits.npy")
  assert got.dtype == np.float32 and got.shape == ref.shape == (2, 11, 160)
  print(f"logits.py vs transformers: max |diff| {np.abs(got - ref).max():.3g}, "
        f"scale {np.abs(ref).max():.3g}")
  assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

  exported = _run(CONVERT, "export", "--checkpoint_dir", ours, "--out_dir", back,
                  "--max_shard_size", "30KB")
  assert exported.returncode == 0, exported.stderr
  assert_bit_exact(load_tensors(str(back)), load_tensors(str(hf_dir)))
  assert (back / "tokenizer.model").read_bytes() == b"not a real tokenizer"
  config = json.loads((back / "config.json").read_text())
  original = json.loads((hf_dir / "config.json").read_text())
  for key in ("vocab_size", "dtype", "layer_types", "query_pre_attn_scalar",
              "sliding_window", "num_key_value_heads", "head_dim"):
    assert config[key] == original[key], key
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(back), dtype=torch.float32, attn_implementation="eager",
      output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_array_equal(logits_of(loaded, tokens), ref)


def test_errors_are_one_message_naming_the_tensor(tmp_path):
  hf_dir = tmp_path / "hf"
  hf_model(hf_dir)
  name = "model.layers.1.mlp.down_proj.weight"
  shard = json.loads((hf_dir / "model.safetensors.index.json").read_text())[
      "weight_map"][name]
  tensors = load_file(str(hf_dir / shard))
  tensors[name] = np.zeros((32, 60), np.float32)
  save_file(tensors, str(hf_dir / shard), metadata={"format": "pt"})
  result = _run(CONVERT, "import", "--hf_dir", hf_dir, "--out_dir", tmp_path / "x")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.startswith("convert_hf.py: error: Checkpoint ")
  assert f"{name}: checkpoint has (32, 60), config.json expects (32, 64)" in result.stderr

  convert = _tool(CONVERT)
  del tensors[name]
  save_file(tensors, str(hf_dir / shard), metadata={"format": "pt"})
  with pytest.raises(cli.ConfigError, match=f"{name}: missing from the checkpoint"):
    convert.main(["import", "--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "x")])
  with pytest.raises(cli.ConfigError, match="config.json not found"):
    convert.main(["import", "--hf_dir", str(tmp_path), "--out_dir", str(tmp_path / "x")])
  with pytest.raises(cli.ConfigError, match="neither a model directory"):
    convert.main(["export", "--checkpoint_dir", str(tmp_path), "--out_dir",
                  str(tmp_path / "y")])


def test_logits_tool_rejects_bad_tokens(tmp_path):
  hf_dir, ours = tmp_path / "hf", tmp_path / "ours"
  hf_model(hf_dir)
  convert, logits = _tool(CONVERT), _tool(LOGITS)
  assert convert.main(["import", "--hf_dir", str(hf_dir), "--out_dir", str(ours)]) == 0
  with pytest.raises(cli.ConfigError, match="exists and is not empty; pass --overwrite"):
    convert.main(["import", "--hf_dir", str(hf_dir), "--out_dir", str(ours)])
  for array, message in ((np.zeros((3,), np.int32), r"\[batch, length\]"),
                         (np.full((1, 4), 160, np.int32), "token id 160, outside"),
                         (np.zeros((1, 4), np.float32), "integer array")):
    np.save(tmp_path / "t.npy", array)
    with pytest.raises(cli.ConfigError, match=message):
      logits.main(["--checkpoint_dir", str(ours), "--tokens_npy", str(tmp_path / "t.npy"),
                   "--out_npy", str(tmp_path / "o.npy")])


def test_training_starts_from_an_imported_checkpoint(tmp_path, capsys, monkeypatch):
  from posttrain_jax.core.optimizer import OptimizerConfig
  from posttrain_jax.data.dataset_config import DatasetConfig
  from posttrain_jax.jobs import train as train_lib

  # the reporter's default stream is bound at import; log to capsys' stdout
  monkeypatch.setattr(train_lib, "ProgressReporter", functools.partial(
      train_lib.ProgressReporter, stream=sys.stdout))
  train = train_lib.train

  hf_dir, ours, run_dir = tmp_path / "hf", tmp_path / "ours", tmp_path / "run"
  model = hf_model(hf_dir, vocab_size=2048)  # the pydoc_lm task's vocabulary
  convert = _tool(CONVERT)
  assert convert.main(["import", "--hf_dir", str(hf_dir), "--out_dir", str(ours)]) == 0
  cfg = params_checkpoint.read_model_gin(str(ours / "model.gin"))
  assert not cfg.scan_layers
  cfg = dataclasses.replace(cfg, scan_layers=True)  # restore converts the layout
  data = DatasetConfig(task_name="pydoc_lm", split="train", sequence_length=32,
                       batch_size=8, seed=0)

  def run(steps):
    # learning rate 0: the run's parameters stay the imported ones exactly
    return train(model_config=cfg, run_dir=str(run_dir), train_data=data,
                 num_steps=steps, optimizer=OptimizerConfig(learning_rate=0.0),
                 ici_parallelism={"fsdp": 4, "tensor": 2}, checkpoint_every=1,
                 log_every=1, initial_checkpoint=str(ours),
                 operative_config=params_checkpoint.model_gin(cfg))

  first = run(2)
  log = capsys.readouterr().out
  assert first.resumed_from is None and first.initialised_from == str(ours)
  assert f"initialised from initial_checkpoint {ours}" in log
  assert 0 < first.losses[1] < 20 and np.isfinite(first.losses[2])

  second = run(3)
  log = capsys.readouterr().out
  assert second.resumed_from == 2 and second.initialised_from is None
  assert (f"resumed from step 2 of the run's own checkpoint (it wins over "
          f"initial_checkpoint {ours}, which is ignored)") in log
  assert sorted(second.losses) == [3]

  back = tmp_path / "back"
  assert convert.main(["export", "--checkpoint_dir", str(run_dir), "--out_dir",
                       str(back)]) == 0
  assert "step 3" in capsys.readouterr().out
  assert_bit_exact(load_tensors(str(back)), load_tensors(str(hf_dir)))
  assert (back / "tokenizer.model").is_file()  # found via the run's hf_metadata
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(back), dtype=torch.float32, attn_implementation="eager")
  tokens = np.arange(20).reshape(2, 10)
  np.testing.assert_array_equal(logits_of(loaded, tokens), logits_of(model, tokens))
