"""SentencePiece vocabulary access (T5 ids: pad=0, eos=1, unk=2, no bos)."""

from __future__ import annotations

import functools
import os

from posttrain_jax.data._tf import tf  # noqa: F401  (quiet TF before seqio)
import seqio

DEFAULT_VOCAB_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "vocab", "pydoc_sp2k.model")


@functools.lru_cache(maxsize=None)
def _load(path: str) -> seqio.SentencePieceVocabulary:
    return seqio.SentencePieceVocabulary(path)


def get_vocabulary(path: str | os.PathLike | None = None) -> seqio.SentencePieceVocabulary:
    """Return a seqio vocabulary for a local SentencePiece ``.model`` file.

    Defaults to the shipped 2048-piece ``pydoc_sp2k.model``. The same object is
    returned for the same (absolute) path. Raises ``FileNotFoundError`` naming
    the path if the file does not exist.
    """
    path = os.path.abspath(os.fspath(path if path is not None else DEFAULT_VOCAB_PATH))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return _load(path)
