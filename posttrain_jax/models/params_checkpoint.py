"""Model directories: a parameters-only orbax checkpoint plus its ModelConfig.

  DIR/checkpoint/        orbax pytree of the parameters (unscanned or scanned)
  DIR/model.gin          ModelConfig bindings: pass it as a run's model gin file
  DIR/hf_metadata.json   the source's config.json, stored dtype and vocabulary
                         size, so an export writes the same HF checkpoint back
  DIR/hf_files/          tokenizer.model etc., copied through from the HF directory

`train(initial_checkpoint=DIR)` restores the parameters onto the trainer's
shardings with `restore_params`, converting between the scanned and unscanned
layouts when the run's ModelConfig.scan_layers differs from the saved layout.
`locate` also accepts a training run directory (RUN/checkpoints/STEP/state, of
which only the TrainState's params are read; of a Streaming DiLoCo run, the
outer params), so export and the logits checker work on fine-tuned runs; such a run finds its ModelConfig in RUN/config.gin.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from posttrain_jax.core.checkpointing import check_compatible
from posttrain_jax.models import ModelConfig, Transformer, layout

PARAMS = "checkpoint"
MODEL_GIN = "model.gin"
HF_METADATA = "hf_metadata.json"
HF_FILES = "hf_files"
RUN_CONFIG = "config.gin"


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a parameter tree lives: an orbax item and the subtree holding params."""
  path: str                # the orbax item directory
  subtree: str | None      # "params" inside a run's TrainState, None for a model dir
  root: str                # the model or run directory (model.gin / config.gin)
  step: int | None = None  # the run step, for run directories


def _gin_value(value) -> str:
  return repr(tuple(value)) if isinstance(value, (tuple, list)) else repr(value)


def model_gin(cfg: ModelConfig, header: str = "") -> str:
  """Gin bindings that rebuild `cfg` (every field, so nothing depends on defaults)."""
  lines = [f"# {line}".rstrip() for line in header.splitlines()]
  lines += [f"ModelConfig.{f.name} = {_gin_value(getattr(cfg, f.name))}"
            for f in dataclasses.fields(cfg)]
  return "\n".join(lines) + "\n"


def read_model_gin(path: str) -> ModelConfig:
  """ModelConfig from the unscoped `ModelConfig.*` bindings of a gin file.

  Parses without binding anything, so the process's gin configuration stays
  untouched; reads a model.gin, a model preset or a run's operative config.gin
  (other configurables and their bindings are ignored; macros and includes
  are resolved).
  """
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  from posttrain_jax import GIN_DIR  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  macros: dict[str, Any] = {}
  values: dict[str, Any] = {}

  def parse(file: str, seen: tuple[str, ...]):
    if not os.path.isfile(file):
      raise FileNotFoundError(f"Gin file not found: {file}")
    with open(file) as f:
      text = f.read()
    parser = config_parser.ConfigParser(text, gin_config.ParserDelegate(skip_unknown=True))
    for statement in parser:
      if isinstance(statement, config_parser.IncludeStatement):
        base = [os.path.dirname(file), GIN_DIR, os.getcwd()]
        found = [os.path.join(b, statement.filename) for b in base
                 if os.path.isfile(os.path.join(b, statement.filename))]
        if not found or found[0] in seen:
          raise FileNotFoundError(f"{file}: cannot include {statement.filename!r}")
        parse(found[0], seen + (found[0],))
      elif isinstance(statement, config_parser.BindingStatement):
        if not statement.arg_name:
          macros[statement.selector] = statement.value
        elif (not statement.scope and statement.selector.split(".")[-1] == "ModelConfig"
              and statement.arg_name in fields):
          values[statement.arg_name] = statement.value

  parse(os.path.abspath(path), (os.path.abspath(path),))
  for name, value in values.items():
    if isinstance(value, gin_config.ConfigurableReference):  # a %MACRO reference
      macro = value.scoped_selector.split("/")[0]
      if macro not in macros:
        raise ValueError(f"{path}: ModelConfig.{name} uses undefined macro %{macro}")
      values[name] = macros[macro]
  missing = [f.name for f in dataclasses.fields(ModelConfig)
             if f.default is dataclasses.MISSING and f.name not in values]
  if missing:
    raise ValueError(f"{path} does not set ModelConfig.{', ModelConfig.'.join(missing)}.")
  return ModelConfig(**values)


def save(directory: str, params, cfg: ModelConfig, *,
         hf_metadata: dict[str, Any] | None = None, header: str = "") -> None:
  """Writes DIR/checkpoint (params), DIR/model.gin and DIR/hf_metadata.json."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS), params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(directory, MODEL_GIN), "w") as f:
    f.write(model_gin(cfg, header))
  if hf_metadata is not None:
    write_hf_metadata(directory, hf_metadata)


def write_hf_metadata(directory: str, metadata: dict[str, Any]) -> None:
  with open(os.path.join(directory, HF_METADATA), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
    f.write("\n")


def read_hf_metadata(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, HF_METADATA)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _run_steps(checkpoints: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(checkpoints)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoints, n, "state")))


def _params_subtree(state_dir: str) -> str:
  """"params" of a TrainState; "outer_params" (θ̃) of a Streaming DiLoCo state."""
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
  return "outer_params" if "params" not in tree and "outer_params" in tree else "params"


def locate(directory: str, step: int | None = None) -> Location:
  """Finds the parameters in a model directory, a run directory or a run step.

  A run directory's own checkpoints (RUN/checkpoints/STEP) always win over a
  model directory's checkpoint/ inside it, so nothing written into a run
  directory later (e.g. a merge's output) can stand in for the run.
  """
  d = os.path.abspath(directory)
  run_steps = (_run_steps(os.path.join(d, "checkpoints"))
               if os.path.isdir(os.path.join(d, "checkpoints")) else [])
  if os.path.isdir(os.path.join(d, PARAMS)) and not run_steps:
    return Location(os.path.join(d, PARAMS), None, d)
  if os.path.isdir(os.path.join(d, "checkpoints")):
    steps = run_steps
    if not steps:
      raise FileNotFoundError(f"{d}/checkpoints holds no finished checkpoint.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"{d}/checkpoints has no step {step}; steps: {steps}.")
    path = os.path.join(d, "checkpoints", str(step), "state")
    return Location(path, _params_subtree(path), d, step)
  if os.path.isdir(os.path.join(d, "state")) and os.path.basename(d).isdigit():
    path = os.path.join(d, "state")
    return Location(path, _params_subtree(path),
                    os.path.dirname(os.path.dirname(d)), int(os.path.basename(d)))
  raise FileNotFoundError(
      f"{d} is neither a model directory (holding {PARAMS}/ and {MODEL_GIN}, as "
      "written by tools/convert_hf.py import) nor a run directory (holding "
      "checkpoints/STEP/state).")


def model_config_of(location: Location, model_gin_path: str | None = None) -> ModelConfig:
  """The ModelConfig of a located checkpoint: an explicit gin file, else
  DIR/model.gin, else a run's operative RUN/config.gin."""
  candidates = [model_gin_path] if model_gin_path else [
      os.path.join(location.root, MODEL_GIN), os.path.join(location.root, RUN_CONFIG)]
  for path in candidates:
    if path and os.path.isfile(path):
      return read_model_gin(path)
  raise FileNotFoundError(f"No {' or '.join(candidates)}: pass the model's gin "
                          "file with --model_gin.")


def saved_params(location: Location):
  """Tree of the saved parameters' metadata (shape, dtype), without reading them."""
  handler = ocp.StandardCheckpointHandler()  # item-level: also inside a run's step
  tree = handler.metadata(epath.Path(location.path)).tree
  return tree[location.subtree] if location.subtree else tree


def abstract_params(cfg: ModelConfig, sharding=None):
  """ShapeDtypeStructs of the model's parameters (optionally with one sharding)."""
  def init(rng):
    return Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  if sharding is None:
    return shapes
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def _stack_abstract(leaves: list) -> jax.ShapeDtypeStruct:
  x = leaves[0]
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(leaves),) + tuple(x.shape), x.dtype, sharding=sharding)


def _take_abstract(x: jax.ShapeDtypeStruct, _: int) -> jax.ShapeDtypeStruct:
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
  return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)


def restore_params(directory: str, abstract, cfg: ModelConfig, *, step: int | None = None):
  """Restores parameters onto `abstract`'s shardings and dtypes.

  `abstract` is the model's parameter tree of ShapeDtypeStructs with shardings
  (e.g. Trainer.abstract_state.params). A checkpoint in the other layout
  (scanned vs unscanned) is restored in its own layout and converted on device.
  Raises CheckpointMismatchError naming every mis-shaped, missing or extra array.
  """
  location = locate(directory, step)
  saved = saved_params(location)
  saved_scanned, model_scanned = layout.is_scanned(saved), layout.is_scanned(abstract)
  target = abstract
  if saved_scanned != model_scanned:
    target = layout.to_layout(abstract, cfg, saved_scanned,
                              stack=_stack_abstract, take=_take_abstract)
  check_compatible(saved, target, location.path, fix=(
      f"Fix: configure the model as the checkpoint was written ({location.root}/"
      f"{MODEL_GIN if location.subtree is None else RUN_CONFIG})."))
  item = {location.subtree: target} if location.subtree else target
  restored = ocp.PyTreeCheckpointer().restore(location.path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  restored = restored[location.subtree] if location.subtree else restored
  if saved_scanned != model_scanned:
    convert = lambda t: layout.to_layout(t, cfg, model_scanned, stack=jnp.stack)
    restored = jax.jit(convert, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))(
        restored)
  return restored


def load_numpy_params(directory: str, cfg: ModelConfig, *, step: int | None = None):
  """The parameters as host numpy arrays in cfg's layout and param_dtype."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  params = restore_params(directory, abstract_params(cfg, device), cfg, step=step)
  return jax.tree.map(np.asarray, params)
