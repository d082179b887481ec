"""Build the offline English corpus shipped in ``posttrain_jax/data/corpus``.

Sources (all ship with CPython, nothing is downloaded):
  * ``pydoc_data.topics.topics``: the Python language reference topics.
  * docstrings of pure-Python standard-library modules (module, class,
    function and method docstrings), imported in sorted order.

Each document becomes one or more lines (whitespace collapsed, at most
``--max-line-chars`` characters, split at paragraph/sentence boundaries).
Documents are assigned to train/validation by a stable hash of their text.

Usage: python tools/make_corpus.py [--out-dir DIR] [--validation-percent 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import warnings

# Packages/modules that are unsafe or pointless to import (GUI, side effects,
# test suites, installers) -- skipped together with all their submodules.
_SKIP_PREFIXES = (
    "__main__", "__phello__", "_pydev", "antigravity", "this", "idlelib",
    "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "distutils", "msilib", "_msi", "winreg", "winsound",
    "_winapi", "nturl2path", "ntpath", "msvcrt", "_osx_support", "_aix_support",
    "_bootsubprocess", "idle", "site", "sitecustomize", "usercustomize",
    "webbrowser", "pydoc", "crypt", "nis", "ossaudiodev", "spwd",
)
_MIN_DOC_CHARS = 80
_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


def _skip(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _SKIP_PREFIXES)


def stdlib_module_names() -> list[str]:
    """Sorted names of pure-Python (``.py``) stdlib modules, incl. submodules.

    Walks the stdlib directory without importing anything; skipped packages
    are not descended into.
    """
    names = []

    def walk(path: str, prefix: str) -> None:
        for info in pkgutil.iter_modules([path]):
            name = prefix + info.name
            if _skip(name) or name == "site-packages":
                continue
            sub = os.path.join(path, info.name)
            if info.ispkg:
                if os.path.isfile(os.path.join(sub, "__init__.py")):
                    names.append(name)
                    walk(sub, name + ".")
            elif os.path.isfile(sub + ".py"):
                names.append(name)

    walk(sysconfig.get_paths()["stdlib"], "")
    return sorted(names)


def _module_docstrings(mod) -> list[str]:
    """Own docstrings of a module and the classes/functions it defines."""
    docs = [mod.__doc__]
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__)
            for _, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    docs.append(member.__doc__)
        elif inspect.isfunction(obj):
            docs.append(obj.__doc__)
    return [d for d in docs if isinstance(d, str)]


def stdlib_docstrings() -> tuple[list[str], int]:
    """Docstrings of importable pure-Python stdlib modules; (docs, n_modules)."""
    docs, n_ok = [], 0
    for name in stdlib_module_names():
        try:
            with warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 -- any import failure: skip
            continue
        n_ok += 1
        docs.extend(_module_docstrings(mod))
    return docs, n_ok


def pydoc_topics() -> list[str]:
    """The language-reference topics, sorted by topic name."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _split_long(text: str, max_chars: int) -> list[str]:
    """Split one whitespace-collapsed paragraph at sentence, then word ends."""
    out, cur = [], ""
    pieces = _SENTENCE_END.split(text)
    words = []
    for piece in pieces:
        words.extend([piece] if len(piece) <= max_chars else piece.split(" "))
    for w in words:
        w = w[:max_chars]
        if cur and len(cur) + 1 + len(w) > max_chars:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    return out


def to_lines(doc: str, max_chars: int) -> list[str]:
    """One document -> lines of <= max_chars, packing whole paragraphs."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        para = _WS.sub(" ", para).strip()
        if para:
            paragraphs.extend(_split_long(para, max_chars))
    lines, cur = [], ""
    for para in paragraphs:
        if cur and len(cur) + 1 + len(para) > max_chars:
            lines.append(cur)
            cur = para
        else:
            cur = f"{cur} {para}" if cur else para
    if cur:
        lines.append(cur)
    return lines


def is_validation(doc_key: str, percent: int) -> bool:
    """Stable document-level split (independent of PYTHONHASHSEED)."""
    h = int.from_bytes(hashlib.sha256(doc_key.encode("utf-8")).digest()[:8], "big")
    return h % 100 < percent


def main(argv=None) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.join(repo, "posttrain_jax", "data", "corpus"))
    p.add_argument("--validation-percent", type=int, default=3)
    p.add_argument("--max-line-chars", type=int, default=2000)
    p.add_argument("--min-doc-chars", type=int, default=_MIN_DOC_CHARS)
    args = p.parse_args(argv)

    warnings.simplefilter("ignore")  # deprecated modules warn on access
    topics = pydoc_topics()
    sdocs, n_mods = stdlib_docstrings()
    seen, train, val = set(), [], []
    n_docs = {"topics": 0, "docstrings": 0}
    for source, docs in (("topics", topics), ("docstrings", sdocs)):
        for doc in docs:
            key = _WS.sub(" ", doc).strip()
            if len(key) < args.min_doc_chars or key in seen:
                continue
            seen.add(key)
            n_docs[source] += 1
            target = val if is_validation(key, args.validation_percent) else train
            target.extend(to_lines(doc, args.max_line_chars))

    os.makedirs(args.out_dir, exist_ok=True)
    for split, lines in (("train", train), ("validation", val)):
        path = os.path.join(args.out_dir, f"pydoc_{split}.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(line + "\n" for line in lines)
        print(f"{split}: {len(lines)} lines, {sum(map(len, lines))} chars -> {path}")
    print(f"documents: {n_docs['topics']} topics + {n_docs['docstrings']} docstrings "
          f"from {n_mods} stdlib modules (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
