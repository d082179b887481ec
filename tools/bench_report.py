"""Reporting half of tools/bench_train.py: the peak-TFLOP/s table used for MFU
and the markdown table of benchmark rows (one row per engine)."""

from __future__ import annotations

# Dense bf16 peak TFLOP/s per device (vendor spec sheets, without sparsity).
# Matched as lower-case substrings of device_kind, first match wins.
PEAK_TFLOPS = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("l4", 121.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)


def peak_tflops_for(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for pattern, tflops in PEAK_TFLOPS:
    if pattern in kind:
      return tflops
  return None


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(int(n))


def _cells(row: dict, with_ratio: bool) -> list[tuple[str, str]]:
  mfu = "n/a" if row["mfu_percent"] is None else f"{row['mfu_percent']:.1f}%"
  mem = row["peak_memory_bytes"]
  mem = "n/a" if mem is None else f"{mem / 2**30:.2f} GiB ({row['peak_memory_source']})"
  cells = [
      ("engine", row["engine"]),
      ("step", row["step"]),
      ("backend", row["backend"]),
      ("devices", str(row["devices"])),
      ("device kind", row["device_kind"]),
      ("mesh", ",".join(f"{k}={v}" for k, v in row["mesh"].items()) or "-"),
      ("model", row["model"]),
      ("params", _human(row["params"])),
      ("batch x seq", f"{row['batch_size']} x {row['seq_len']}"),
      ("tokens/s", f"{row['tokens_per_s']:,.0f}"),
      ("step ms", f"{row['step_ms']:.1f}"),
      ("model TFLOP/s/dev", f"{row['model_tflops_per_device']:.3f}"),
      ("MFU", mfu),
      ("peak mem", mem),
      ("compile s", f"{row['compile_s']:.1f}"),
  ]
  if with_ratio:
    ratio = row.get("ours_speedup")
    cells.append(("ours / this", "-" if ratio is None else f"{ratio:.2f}x"))
  return cells


def table(rows: list[dict]) -> str:
  cells = [_cells(r, len(rows) > 1) for r in rows]
  widths = [max(len(cells[0][i][0]), *(len(r[i][1]) for r in cells))
            for i in range(len(cells[0]))]
  line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
  return "\n".join([line([h for h, _ in cells[0]]),
                    "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line([v for _, v in r]) for r in cells])
