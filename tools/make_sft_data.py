"""Build the small instruction (SFT) set shipped in ``posttrain_jax/data/corpus``.

Made from the shipped corpus (CPython documentation, one document per line;
nothing is downloaded): each document's sentences fill one conversation of
one of these kinds, picked by a seeded generator:

  continue     user: "Continue the documentation after this sentence: S1"  model: S2
  repeat       user: "Repeat exactly: S1"                                    model: S1
  complete     user: 'Write the sentence that starts with "W1 W2 W3 W4".'     model: S1
  section      user: 'What does the section "T" say first?'                  model: S1
               (documents with a reStructuredText title, T; S1 its first sentence)
  two_turns    continue, then user: "And after that?"  model: S3
               (a quarter of them behind a system message)

"repeat" and "complete" lines use the {"prompt", "response"} form, the others
{"messages": [...]}, so the shipped files exercise both. The training split
comes from pydoc_train.txt, the held-out split from pydoc_validation.txt
(documents the LM never trained on).

Usage: python tools/make_sft_data.py [--out-dir DIR] [--max-train 2400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "posttrain_jax", "data", "corpus")
SYSTEM = "You answer with sentences from the Python documentation."
_TITLE = re.compile(r"^(.{3,60}?) [*=^-]{4,} (.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
MIN_CHARS, MAX_CHARS = 20, 160


def sentences(text: str) -> list[str]:
    """Sentences of a document between MIN_CHARS and MAX_CHARS characters, in order
    (a run of usable sentences stops at the first unusable one)."""
    out = []
    for s in _SENTENCE_END.split(text.strip()):
        s = re.sub(r"\s*[*=^-]{4,}\s*", " ", s).strip()
        if not MIN_CHARS <= len(s) <= MAX_CHARS:
            if out:
                break
            continue
        out.append(s)
    return out


def conversation(doc: str, rng: random.Random) -> dict | None:
    """One conversation from a document, or None if it has too few sentences."""
    title = _TITLE.match(doc)
    body = sentences(title.group(2) if title else doc)
    kinds = []
    if title and body:
        kinds.append("section")
    if len(body) >= 1:
        kinds += ["repeat", "complete"]
    if len(body) >= 2:
        kinds += ["continue", "continue"]
    if len(body) >= 3:
        kinds += ["two_turns", "two_turns"]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    user = lambda c: {"role": "user", "content": c}
    model = lambda c: {"role": "model", "content": c}
    if kind == "repeat":
        return {"prompt": f"Repeat exactly: {body[0]}", "response": body[0]}
    if kind == "complete":
        start = " ".join(body[0].split()[:4])
        return {"prompt": f'Write the sentence that starts with "{start}".',
                "response": body[0]}
    if kind == "section":
        return {"messages": [user(f'What does the section "{title.group(1)}" say first?'),
                             model(body[0])]}
    messages = [user(f"Continue the documentation after this sentence: {body[0]}"),
                model(body[1])]
    if kind == "two_turns":
        messages += [user("And after that?"), model(body[2])]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def build(lines: list[str], seed: int, limit: int | None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for line in lines:
        c = conversation(line, rng)
        if c is not None:
            out.append(c)
        if limit is not None and len(out) >= limit:
            break
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=CORPUS_DIR)
    parser.add_argument("--max-train", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, source, limit in (("train", "pydoc_train.txt", args.max_train),
                                 ("validation", "pydoc_validation.txt", None)):
        with open(os.path.join(CORPUS_DIR, source)) as f:
            lines = [line for line in f if line.strip()]
        records = build(lines, args.seed, limit)
        path = os.path.join(args.out_dir, f"pydoc_sft_{split}.jsonl")
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} conversations from {len(lines)} documents")


if __name__ == "__main__":
    main()
