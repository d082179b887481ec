"""Train the shipped SentencePiece vocabulary from the train corpus.

Unigram model with T5/seqio ids (pad=0, eos=1, unk=2, no bos) and byte
fallback, so any UTF-8 text encodes without <unk>. Training is made
deterministic: fixed RNG seed, no input sampling/shuffling, one thread.

Usage: python tools/train_vocab.py [--vocab-size 2048] [--input FILE] [--output FILE.model]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA = os.path.join(_REPO, "posttrain_jax", "data")


def train(input_path: str, output_path: str, vocab_size: int, seed: int = 0) -> None:
    """Train a unigram model on ``input_path`` and write it to ``output_path``."""
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=input_path,
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=vocab_size,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            byte_fallback=True,
            character_coverage=0.9995,
            input_sentence_size=0,            # use every line
            shuffle_input_sentence=False,
            num_threads=1,                    # thread scheduling can change results
            max_sentence_length=8192,         # bytes; corpus lines are <= ~2000 chars
            split_digits=True,
            minloglevel=2,
        )
        with open(prefix + ".model", "rb") as f:
            proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    # Drop machine-specific paths recorded in the trainer spec so reruns are
    # byte-identical.
    proto.trainer_spec.model_prefix = os.path.splitext(os.path.basename(output_path))[0]
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append(os.path.basename(input_path))
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=os.path.join(_DATA, "corpus", "pydoc_train.txt"))
    p.add_argument("--output", default=os.path.join(_DATA, "vocab", "pydoc_sp2k.model"))
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train(args.input, args.output, args.vocab_size, args.seed)
    sp = spm.SentencePieceProcessor(model_file=args.output)
    print(f"wrote {args.output}: vocab {sp.get_piece_size()}, pad={sp.pad_id()} "
          f"eos={sp.eos_id()} unk={sp.unk_id()} bos={sp.bos_id()}")


if __name__ == "__main__":
    main()
