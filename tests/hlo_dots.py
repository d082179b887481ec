"""Dot forms in an optimized HLO module (the tests of models/row_major_matmul.py
and models/softcap_attention.py)."""

import re


def lhs_transposed_dots(hlo: str) -> list[str]:
  """Dots whose left operand is contracted along a dimension other than its
  last: the form XLA:CPU runs with Eigen rather than YNNPACK."""
  shapes = {}
  for m in re.finditer(r"%?([\w.\-]+) = \w+\[([\d,]*)\]", hlo):
    shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
  bad = []
  for m in re.finditer(r"dot\(%?([\w.\-]+), [^)]*\)[^\n]*?lhs_contracting_dims=\{([\d,]*)\}", hlo):
    rank = len(shapes[m.group(1)])
    if [int(d) for d in m.group(2).split(",")] != [rank - 1]:
      bad.append(m.group(0))
  return bad
