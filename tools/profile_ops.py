"""Where a compiled program's time goes, op by op: a jax.profiler trace summed by
the source operation of each XLA op.

  python tools/profile_ops.py TRACE_DIR HLO.txt [--top 25] [--per 128]

As a library (tools/bench_train.py and tools/bench_sample.py `--profile DIR`):

  with traced(directory):          # jax.profiler trace, perfetto JSON kept
    run the program
  print(table(summarize(directory, compiled.as_text()), per=steps))

XLA:CPU reports each executed op (fusion, dot, copy, ...) as one trace event
only when `--xla_cpu_enable_xprof_traceme=true` is in XLA_FLAGS before JAX
starts; `traced` says so when the trace holds no op events. Each op is mapped
to the JAX operation it came from through the `op_name` metadata of the
optimized HLO (layer numbers folded: "layer_*"), and ops without metadata
(copies, loop bookkeeping) are listed by their HLO text. The table gives
microseconds per call of the program (or per `per` iterations of a loop), the
number of XLA ops behind each row, and the share of all op time. Op time is
the sum of the events' durations, so ops that ran at the same time on two
threads count twice: compare it with the wall time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys

_RUNTIME = ("ThunkExecutor", "$", "Slinky", "PjRt", "TfrtCpu")
_FLAG = "--xla_cpu_enable_xprof_traceme=true"


@contextlib.contextmanager
def traced(directory: str):
  """jax.profiler trace into `directory`, with a perfetto JSON to summarize."""
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    yield
  if jax.default_backend() == "cpu" and _FLAG not in os.environ.get("XLA_FLAGS", ""):
    print(f"profile_ops: XLA:CPU records op events only with XLA_FLAGS={_FLAG}",
          file=sys.stderr)


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO op name -> its JAX source (op_name metadata, layer numbers folded), or
  the op's own HLO text (shortened) where it has no metadata."""
  sources = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w-]+)\(", line)
    if not m:
      continue
    op_name = re.search(r'op_name="([^"]+)"', line)
    if op_name:
      source = re.sub(r"layer_\d+", "layer_*", op_name.group(1))
      source = re.sub(r"^jit\([^)]*\)/", "", source)
    else:
      source = f"[{m.group(3)} {m.group(2)}]"
    sources[m.group(1)] = source
  return sources


def op_events(directory: str) -> list[dict]:
  """The complete ("X") op events of the newest perfetto trace under directory."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}; trace with "
                            "create_perfetto_trace=True (profile_ops.traced).")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME)]


def summarize(directory: str, hlo_texts) -> list[dict]:
  """Rows {source, us, ops, calls} sorted by time, over the trace's op events.

  hlo_texts: one optimized HLO text or several (programs traced together)."""
  if isinstance(hlo_texts, str):
    hlo_texts = [hlo_texts]
  sources = {}
  for text in hlo_texts:
    sources.update(op_sources(text))
  total, ops, calls = collections.Counter(), collections.defaultdict(set), collections.Counter()
  for e in op_events(directory):
    source = sources.get(e["name"], f"[{e['name']}]")
    total[source] += e.get("dur", 0.0)
    ops[source].add(e["name"])
    calls[source] += 1
  return [{"source": s, "us": us, "ops": len(ops[s]), "calls": calls[s]}
          for s, us in total.most_common()]


def table(rows: list[dict], per: int = 1, top: int = 25, width: int = 90) -> str:
  """Markdown table of the `top` rows: us per call (divided by `per`), ops, share."""
  all_us = sum(r["us"] for r in rows) or 1.0
  lines = [f"op time {all_us / 1e3 / per:.2f} ms per {'call' if per == 1 else 'iteration'}"
           f" over {sum(r['ops'] for r in rows)} XLA ops",
           "", "| source | us | XLA ops | share |", "|---|---|---|---|"]
  for r in rows[:top]:
    source = r["source"] if len(r["source"]) <= width else "..." + r["source"][-width:]
    lines.append(f"| {source} | {r['us'] / per:,.0f} | {r['ops']} | "
                 f"{r['us'] / all_us:.1%} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="profile_ops.py", description=__doc__.split("\n")[0])
  p.add_argument("trace_dir")
  p.add_argument("hlo", nargs="+", help="optimized HLO text file(s) of the traced programs")
  p.add_argument("--per", type=int, default=1, help="divide times by this (steps, iterations)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  texts = []
  for path in args.hlo:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  try:
    print(table(summarize(args.trace_dir, texts), args.per, args.top))
  except FileNotFoundError as e:
    print(f"profile_ops.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
