"""Interoperability with Hugging Face checkpoints.

  hf_gemma2      Gemma-2 weights <-> the project's parameter tree (import/export)
  hf_checkpoint  reading/writing safetensors shards and config.json
"""
