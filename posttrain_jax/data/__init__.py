"""Data layer: SentencePiece vocabulary, seqio tasks and the LM input pipeline.

This is the only package that imports TensorFlow/seqio. Submodules:

* ``vocab``    -- ``get_vocabulary``, ``DEFAULT_VOCAB_PATH`` (shipped 2k unigram model).
* ``tasks``    -- ``register_text_lm_task``; registers the ``"pydoc_lm"`` task.
* ``pipeline`` -- ``LMBatchIterator`` (resumable train iterator), ``eval_batches``;
  plain LM and prefix-LM ("inputs" + "targets", ``inputs_length``) tasks.
* ``prompts``  -- ``register_prompt_task``, ``PromptIterator``, ``load_prompts``;
  registers the ``"pydoc_prompts"`` task.
* ``generated``-- ``write_generated_dataset`` (TFDS), ``register_generated_task``,
  ``register_tfds_text_task``.

Names are loaded lazily so ``import posttrain_jax.data`` alone stays cheap.
"""

import importlib

_EXPORTS = {
    "DEFAULT_VOCAB_PATH": "vocab",
    "get_vocabulary": "vocab",
    "register_text_lm_task": "tasks",
    "LMBatchIterator": "pipeline",
    "eval_batches": "pipeline",
    "register_prompt_task": "prompts",
    "PromptIterator": "prompts",
    "load_prompts": "prompts",
    "write_generated_dataset": "generated",
    "register_generated_task": "generated",
    "register_tfds_text_task": "generated",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
