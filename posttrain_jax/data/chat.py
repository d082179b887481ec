"""Instruction (SFT) data: JSON-lines conversations in Gemma's chat format, as a seqio task.

File format: JSON lines, one conversation per line, either

    {"messages": [{"role": "system"|"user"|"model", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}        (one user turn, one model turn)

Other fields are ignored. Roles alternate user / model, starting with the
user (after at most one leading system message) and ending with the model.
Rendering follows Gemma's chat template (Gemma Team 2024, "Gemma 2", and
its tokenizer's chat template):

    <start_of_turn>user\\n{content}<end_of_turn>\\n
    <start_of_turn>model\\n{content}<end_of_turn>\\n  ...  EOS

A system message has no turn of its own (as in Gemma's template): its text
and a blank line go in front of the first user turn. The markers are text:
Gemma's tokenizer encodes each as one control token (ids 106, 107); the
shipped 2k vocabulary spells them in a few pieces. Each part is encoded on
its own and the ids concatenated, so the loss weights follow the roles
exactly: 1 on each model turn's content, its closing ``<end_of_turn>`` and
the final EOS (the model learns to end its turn); 0 on user/system text and
on the ``<start_of_turn>model`` header the prompt already holds. With
``train_on_prompts`` every token has weight 1. No BOS token (the project's
pipelines use none).

``register_sft_task(name, {split: files})`` registers a seqio Task
(``FunctionDataSource``) with features "targets" (int32 ids) and
"loss_weights" (int32 1 + weight, same length: packing needs non-zero entries;
``sft_pipeline`` turns them back into float32 0/1 weights). Conversations longer than the
sequence length are dropped (``overlong="drop"``), cut to it
(``"truncate"``) or refused (``"error"``); ``length_report`` counts them.
``sft_pipeline`` packs the task into model batches. Reading and rendering
import no TensorFlow; seqio/TF load when a task is registered.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

ROLES = ("system", "user", "model")
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
OVERLONG_POLICIES = ("drop", "truncate", "error")
# The shipped instruction set (tools/make_sft_data.py), task "pydoc_sft" (data.tasks).
_CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
PYDOC_SFT_SPLITS = {
    "train": os.path.join(_CORPUS_DIR, "pydoc_sft_train.jsonl"),
    "validation": os.path.join(_CORPUS_DIR, "pydoc_sft_validation.jsonl"),
}

FilePattern = Union[str, Iterable[str]]
Messages = list[tuple[str, str]]  # (role, content)


@dataclasses.dataclass(frozen=True)
class Conversation:
    path: str
    line: int
    messages: tuple[tuple[str, str], ...]


def _files(pattern: FilePattern) -> list[str]:
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    found = []
    for p in patterns:
        matches = sorted(glob.glob(os.fspath(p)))
        if not matches:
            raise FileNotFoundError(f"No SFT data file matches {os.fspath(p)!r}. Fix: point "
                                    "the split at an existing JSONL file of conversations.")
        found += matches
    return found


def _messages(record: Any, where: str) -> Messages:
    """The (role, content) turns of one JSON record, validated."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a line must be a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of "
                             "{\"role\": ..., \"content\": ...} objects.")
        turns = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: message {i} needs \"role\" and \"content\".")
            turns.append((m["role"], m["content"]))
    elif "prompt" in record and "response" in record:
        turns = [("user", record["prompt"]), ("model", record["response"])]
    else:
        raise ValueError(f"{where}: no \"messages\" and no \"prompt\"/\"response\" (keys: "
                         f"{sorted(record)[:6]}). Fix: write {{\"messages\": [{{\"role\": "
                         "\"user\", \"content\": ...}, ...]} or {\"prompt\": ..., "
                         "\"response\": ...}.")
    for i, (role, content) in enumerate(turns):
        if role not in ROLES:
            hint = " (Gemma calls the assistant \"model\")" if role == "assistant" else ""
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; the roles "
                             f"are {', '.join(ROLES)}{hint}.")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({role}) content must be a string, "
                             f"got {type(content).__name__}.")
    body = turns[1:] if turns[0][0] == "system" else turns
    expected = ["user" if i % 2 == 0 else "model" for i in range(len(body))]
    if [r for r, _ in body] != expected or not body or body[-1][0] != "model":
        raise ValueError(f"{where}: roles {[r for r, _ in turns]} do not alternate user, "
                         "model, ... from a user turn (after at most one leading system "
                         "message) to a final model turn.")
    return turns


def read_conversations(pattern: FilePattern) -> list[Conversation]:
    """All conversations of JSONL files, validated (errors name the file and line)."""
    out = []
    for path in _files(pattern):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON line ({e.msg}).") from e
                out.append(Conversation(path, n, tuple(_messages(record, where))))
    return out


def _parts(messages: Sequence[tuple[str, str]]) -> list[tuple[str, float]]:
    """(text, loss weight) parts of a conversation in Gemma's chat format."""
    turns = list(messages)
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
        turns[0] = (turns[0][0], f"{system}\n\n{turns[0][1]}")
    parts = []
    for role, content in turns:
        if role == "user":
            parts.append((f"{START_OF_TURN}user\n{content}{END_OF_TURN}\n", 0.0))
        else:
            parts.append((f"{START_OF_TURN}model\n", 0.0))
            parts.append((f"{content}{END_OF_TURN}\n", 1.0))
    return parts


def render(messages: Sequence[tuple[str, str]], encode: Callable[[str], Sequence[int]],
           eos_id: int, train_on_prompts: bool = False) -> tuple[list[int], list[float]]:
    """Token ids and loss weights of one conversation in Gemma's chat format."""
    ids, weights = [], []
    for text, weight in _parts(messages):
        piece = list(encode(text))
        ids.extend(piece)
        weights.extend([1.0 if train_on_prompts else weight] * len(piece))
    return ids + [eos_id], weights + [1.0]


def render_prompt(messages: Sequence[tuple[str, str]],
                  encode: Callable[[str], Sequence[int]]) -> list[int]:
    """Ids of a conversation that ends with a user turn, then the model's turn
    header: what a sampler continues (the same parts as `render`)."""
    parts = _parts(list(messages) + [("model", "")])[:-1]
    return [i for text, _ in parts for i in encode(text)]


@dataclasses.dataclass(frozen=True)
class SFTTaskSettings:
    splits: Mapping[str, Any]
    vocab_path: str | None
    train_on_prompts: bool
    overlong: str


_SETTINGS: dict[str, SFTTaskSettings] = {}


def task_settings(name: str) -> SFTTaskSettings | None:
    """The settings of a task registered by register_sft_task (None otherwise)."""
    return _SETTINGS.get(name)


def _file_key(pattern: FilePattern) -> tuple:
    return tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in _files(pattern))


@functools.lru_cache(maxsize=16)
def _rendered_files(file_key: tuple, vocab_path: str | None, train_on_prompts: bool):
    from posttrain_jax.data.vocab import get_vocabulary
    vocab = get_vocabulary(vocab_path)
    conversations = read_conversations([p for p, _, _ in file_key])
    rows = [render(c.messages, vocab.encode, vocab.eos_id, train_on_prompts)
            for c in conversations]
    return conversations, rows


def rendered(settings: SFTTaskSettings, split: str):
    """(conversations, [(ids, weights)]) of a split, cached per file version."""
    return _rendered_files(_file_key(settings.splits[split]), settings.vocab_path,
                           settings.train_on_prompts)


@dataclasses.dataclass(frozen=True)
class LengthReport:
    conversations: int
    overlong: int            # longer than the sequence length
    longest: int             # tokens of the longest conversation
    first_overlong: str | None  # "path:line (N tokens)"

    def describe(self, task_name: str, split: str, sequence_length: int, policy: str) -> str:
        done = {"drop": "dropped", "truncate": "truncated"}.get(policy, "refused")
        return (f"SFT task {task_name!r} split {split!r}: {self.conversations} conversations, "
                f"{self.overlong} longer than sequence_length={sequence_length} {done} "
                f"(longest {self.longest} tokens)")


def length_report(name: str, split: str, sequence_length: int) -> LengthReport:
    """Counts the conversations of a split longer than sequence_length."""
    settings = _SETTINGS[name]
    conversations, rows = rendered(settings, split)
    lengths = np.array([len(ids) for ids, _ in rows], np.int64)
    over = np.flatnonzero(lengths > sequence_length)
    first = None
    if over.size:
        c = conversations[int(over[0])]
        first = f"{c.path}:{c.line} ({int(lengths[over[0]])} tokens)"
    return LengthReport(len(rows), int(over.size), int(lengths.max(initial=0)), first)


def check_lengths(name: str, split: str, sequence_length: int) -> LengthReport:
    """length_report, raising for overlong conversations under overlong="error"
    and for a split that keeps no conversation."""
    settings = _SETTINGS[name]
    report = length_report(name, split, sequence_length)
    if report.overlong and settings.overlong == "error":
        raise ValueError(
            f"{report.first_overlong}: conversation longer than sequence_length="
            f"{sequence_length} ({report.overlong} of {report.conversations} in split "
            f"{split!r} of SFT task {name!r}). Fix: raise sequence_length or register the "
            "task with overlong=\"drop\" or \"truncate\".")
    if settings.overlong == "drop" and report.overlong == report.conversations:
        raise ValueError(
            f"Every conversation of split {split!r} of SFT task {name!r} is longer than "
            f"sequence_length={sequence_length} (shortest dropped); nothing is left. Fix: "
            "raise sequence_length or use overlong=\"truncate\".")
    return report


def _dataset_fn(name: str, split: str, shuffle_files: bool, seed: int | None = None):
    from posttrain_jax.data._tf import tf
    del shuffle_files, seed  # examples are shuffled by seqio (seed-deterministic)
    settings = _SETTINGS[name]
    _, rows = rendered(settings, split)
    if not rows:
        raise ValueError(f"The SFT file(s) {_files(settings.splits[split])} of split "
                         f"{split!r} hold no conversations. Fix: point the split at a JSONL "
                         "file with at least one conversation.")
    return tf.data.Dataset.from_tensor_slices({
        "targets": tf.ragged.constant([ids for ids, _ in rows], dtype=tf.int32),
        # 1 + weight, as int32: seqio's packing casts to int32 and measures each
        # feature by its non-zero entries (a 0 weight would cut the feature).
        "loss_weights": tf.ragged.constant([[1 + int(x) for x in w] for _, w in rows],
                                           dtype=tf.int32)})


def _fit_to_length(overlong: str):
    """seqio preprocessor: drop or cut conversations longer than the length."""
    from posttrain_jax.data._tf import tf

    def fn(dataset, sequence_length=None, output_features=None):
        del output_features
        if not sequence_length or not sequence_length.get("targets"):
            return dataset
        length = int(sequence_length["targets"])
        if overlong == "drop":
            return dataset.filter(lambda ex: tf.shape(ex["targets"])[0] <= length)
        return dataset.map(lambda ex: {k: v[:length] for k, v in ex.items()})
    return fn


def register_sft_task(name: str, split_to_files: Mapping[str, FilePattern],
                      vocab_path: str | os.PathLike | None = None,
                      train_on_prompts: bool = False, overlong: str = "drop",
                      validate: bool = True):
    """Registers (or replaces) a seqio Task over JSONL conversation files; returns it.

    With validate (the default) every file is read and checked now (a bad line
    fails here, naming its file and line); otherwise on first use (the shipped
    task, so that importing data.tasks stays cheap). train_on_prompts: loss weight 1 on every token, not just
    the model's turns. overlong: "drop", "truncate" or "error" for
    conversations longer than the sequence length (see ``check_lengths``).
    """
    from posttrain_jax.data._tf import tf
    from posttrain_jax.data.vocab import get_vocabulary
    import seqio
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"Unknown overlong policy {overlong!r}; choose one of "
                         f"{list(OVERLONG_POLICIES)}.")
    splits = {k: (os.fspath(v) if isinstance(v, (str, os.PathLike))
                  else [os.fspath(p) for p in v]) for k, v in split_to_files.items()}
    settings = SFTTaskSettings(splits, None if vocab_path is None else os.fspath(vocab_path),
                               bool(train_on_prompts), overlong)
    for split in splits:
        if validate:
            rendered(settings, split)  # fail now, naming the file and line
        else:
            _files(splits[split])
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    _SETTINGS[name] = settings
    vocab = get_vocabulary(settings.vocab_path)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_dataset_fn, name),
                                        splits=list(splits)),
        preprocessors=[_fit_to_length(overlong)],
        output_features={
            "targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
            "loss_weights": seqio.Feature(vocabulary=seqio.PassThroughVocabulary(1),
                                          add_eos=False, dtype=tf.int32),
        },
        metric_fns=[])


def sft_task(task_name: str, train_files: FilePattern | None = None,
             validation_files: FilePattern | None = None,
             vocab_path: str | None = None, train_on_prompts: bool = False,
             overlong: str = "drop") -> str:
    """gin form of register_sft_task (``sft_task``): registers splits "train"
    (and "validation") and returns task_name, for DatasetConfig.task_name.
    Without train_files: the shipped instruction set (both splits)."""
    if train_files is None:
        train_files = PYDOC_SFT_SPLITS["train"]
        if validation_files is None:
            validation_files = PYDOC_SFT_SPLITS["validation"]
    splits = {"train": train_files}
    if validation_files is not None:
        splits["validation"] = validation_files
    register_sft_task(task_name, splits, vocab_path=vocab_path,
                      train_on_prompts=train_on_prompts, overlong=overlong)
    return task_name
