"""Every collective of an optimized TPU program, with its bytes, as ICI or DCN.

Reads the HLO text of a compiled program (`compiled.as_text()`):

- ICI: all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute
  (and their -start forms). The TPU compiler splits one collective into
  pieces that share a channel_id (async collective fusions: start,
  continuations, done), so a channel counts once. A collective inside a
  while loop (a scanned layer stack, microbatches) counts once per iteration
  (the loop's known_trip_count, else N of its condition i < N). Its replica groups ({{0,1},{2,3}}, iota
  [2,2]<=[4], mesh['a'=2,'b'=2] {'b'}) give the group size n and, where the
  program spans several slices, the slices a group touches
  (device.slice_index of the program's device assignment): groups inside one
  slice are ICI, groups across slices DCN.
- DCN: in a multi-slice program the compiler keeps one SPMD program per slice
  (num_partitions = chips per slice) and turns every collective across
  slices into host transfers of the megascale runtime: a `send` with
  `_xla_megascale_transfer_type` (ALL_GATHER, ALL_REDUCE, ...). Each counts
  once per send (rendezvous).

Bytes. `array_bytes` is the array the collective produces on one device (a
DCN transfer: the payload one device sends). `wire_bytes` is what one device
sends, in the ring model of diloco/traffic.py (n devices in the group):
all-gather (n - 1)/n x result, reduce-scatter (n - 1) x result, all-reduce
2 (n - 1)/n x array, all-to-all (n - 1)/n x array, collective-permute the
array. Every device of a slice runs the same program, so a slice moves
`devices per slice` x the per-device bytes (`Summary.dcn_slice_bytes`: what
one replica moves, traffic.py's unit).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([\d,]*)\]")
_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
        "collective-permute", "collective-broadcast")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (" + "|".join(_OPS) +
    r"|send|while|[a-z][\w\-]*)(-start)?\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{\s*$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|"
                    r"called_computations)=\{?(%[\w.\-]+(?:, ?%[\w.\-]+)*)\}?")
_KINDS = {"ALL_GATHER": "all-gather", "ALL_REDUCE": "all-reduce",
          "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}


def _arrays(shape_text: str) -> list[float]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue
    out.append(size * math.prod(int(d) for d in dims.split(",") if d))
  return out


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a program (per device, per execution of the program)."""

  kind: str            # "all-gather", ...
  link: str            # "ICI" or "DCN"
  group_size: int      # devices (ICI) or slices (DCN) per group
  array_bytes: int     # result on one device (DCN: the payload one device sends)
  count: int           # executions per program run (loop trip counts)
  name: str            # HLO instruction (or megascale rendezvous) name
  groups: str = ""     # replica groups as written in the HLO

  @property
  def wire_bytes(self) -> int:
    """What one device sends per execution (ring model, see the module doc)."""
    n, b = self.group_size, self.array_bytes
    if n <= 1:
      return 0
    if self.link == "DCN":
      if self.kind == "all-gather":
        return (n - 1) * b
      if self.kind == "all-reduce":
        return 2 * (n - 1) * b // n
      return (n - 1) * b // n
    return {"all-gather": (n - 1) * b // n, "reduce-scatter": (n - 1) * b,
            "all-reduce": 2 * (n - 1) * b // n}.get(
                self.kind, b if self.kind == "collective-permute" else (n - 1) * b // n)


@dataclasses.dataclass
class Summary:
  """The collectives of one program and their totals."""

  collectives: list[Collective]
  devices_per_slice: int

  def of(self, link: str) -> list[Collective]:
    return [c for c in self.collectives if c.link == link]

  def wire_bytes(self, link: str) -> int:
    """Bytes one device sends over `link` per program run."""
    return sum(c.wire_bytes * c.count for c in self.of(link))

  @property
  def dcn_slice_bytes(self) -> int:
    """Bytes one slice (replica) sends over DCN per program run."""
    return self.wire_bytes("DCN") * self.devices_per_slice

  def table(self) -> list[tuple]:
    """(link, kind, group size, executions, array bytes, wire bytes per device)
    rows, one per distinct (link, kind, group size), largest traffic first."""
    rows = collections.defaultdict(lambda: [0, 0, 0])
    for c in self.collectives:
      r = rows[(c.link, c.kind, c.group_size)]
      r[0] += c.count
      r[1] += c.array_bytes * c.count
      r[2] += c.wire_bytes * c.count
    return sorted(((k[0], k[1], k[2], *v) for k, v in rows.items()),
                  key=lambda r: (r[0], -r[5]))


def _group_devices(groups: str, num_partitions: int) -> tuple[int, list[list[int]]]:
  """(group size, groups as lists of logical device ids; [] if unparsed)."""
  groups = groups.strip()
  if groups in ("", "{}"):
    return num_partitions, [list(range(num_partitions))]
  if groups.startswith("{{"):
    lists = [[int(x) for x in g.split(",") if x.strip()]
             for g in re.findall(r"\{([\d,\s]*)\}", groups[1:-1])]
    return (len(lists[0]) if lists else 1), lists
  m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", groups)
  if m:  # iota: ids = iota(reshape dims) transposed, reshaped to [G, n]
    g, n = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    perm = [int(p) for p in m.group(4).split(",")] if m.group(4) else list(range(len(dims)))
    ids = _transposed_iota(dims, perm)
    return n, [ids[i * n:(i + 1) * n] for i in range(g)]
  m = re.match(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", groups)
  if m:  # mesh['a'=2,'b'=4] {'b'}: groups vary the listed axes
    axes = [(a.split("=")[0].strip("' "), int(a.split("=")[1]))
            for a in m.group(1).split(",")]
    over = {a.strip("' ") for a in m.group(2).split(",") if a.strip()}
    sizes = [s for _, s in axes]
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    fixed = [i for i, (a, _) in enumerate(axes) if a not in over]
    free = [i for i, (a, _) in enumerate(axes) if a in over]
    lists = []
    for f in itertools.product(*[range(sizes[i]) for i in fixed]):
      base = sum(strides[i] * v for i, v in zip(fixed, f))
      lists.append([base + sum(strides[i] * v for i, v in zip(free, x))
                    for x in itertools.product(*[range(sizes[i]) for i in free])])
    return math.prod(sizes[i] for i in free), lists
  return 1, []


def _transposed_iota(dims: list[int], perm: list[int]) -> list[int]:
  strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
  out_dims = [dims[p] for p in perm]
  return [sum(idx[k] * strides[perm[k]] for k in range(len(perm)))
          for idx in itertools.product(*[range(d) for d in out_dims])]


def _condition_trips(lines: list[str]) -> int:
  """Trips of a while loop from its condition `i < N` (i from 0: lax.scan and
  fori_loop); 1 when the condition has another form."""
  consts = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(lines)))
  for line in lines:
    m = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
    if m and m.group(1) in consts:
      return int(consts[m.group(1)])
  return 1


def _multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """Executions of each computation per run of the entry (while bodies x trips)."""
  edges = collections.defaultdict(list)
  for name, lines in comps.items():
    for line in lines:
      trips = 1
      if " while(" in line:
        m = re.search(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)', line)
        cond = re.search(r"condition=%([\w.\-]+)", line)
        trips = int(m.group(1)) if m else _condition_trips(comps.get(cond.group(1), [])
                                                           if cond else [])
      for m in _CALLS.finditer(line):
        for callee in m.group(2).split(","):
          callee = callee.strip().lstrip("%")
          edges[name].append((callee, trips if m.group(1) == "body" else 1))
  mult = collections.defaultdict(int)

  def visit(name, times, depth=0):
    if depth > 64:
      return
    mult[name] += times
    for callee, k in edges.get(name, ()):
      visit(callee, times * k, depth + 1)
  visit(entry, 1)
  return mult


def parse(hlo_text: str, device_slices: list[int] | None = None) -> Summary:
  """The collectives of an optimized HLO module.

  device_slices: slice_index of each device of the program's device
  assignment (mesh.devices.flat order); None: one slice.
  """
  comps: dict[str, list[str]] = {}
  entry, cur = None, None
  header = hlo_text.split("\n", 1)[0]
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if line.startswith("}"):
      cur = None
    elif cur is not None:
      comps[cur].append(line)
  m = re.search(r"num_partitions=(\d+)", header)
  num_partitions = int(m.group(1)) if m else 1
  slices = device_slices or [0] * num_partitions
  per_slice = num_partitions if num_partitions < len(slices) else max(
      1, len(slices) // max(1, len(set(slices))))
  mult = _multiplicities(comps, entry) if entry else collections.defaultdict(lambda: 1)
  seen: dict[str, Collective] = {}
  out: list[Collective] = []
  for comp, lines in comps.items():
    times = mult.get(comp, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, shape, op, start, rest = m.groups()
      if op == "send":
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest)
        if not kind:
          continue
        key = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', rest)
        key = key.group(1) if key else name
        if key in seen:
          continue
        payload = (_arrays(shape) or [0])[0]
        c = Collective(_KINDS.get(kind.group(1), kind.group(1).lower()), "DCN",
                       len(set(slices)), int(payload), times, key)
        seen[key] = c
        out.append(c)
        continue
      if op not in _OPS:
        continue
      channel = re.search(r"channel_id=(\d+)", rest)
      key = f"channel{channel.group(1)}" if channel else f"{comp}/{name}"
      if key in seen:
        continue
      arrays = _arrays(shape)
      if start and op == "all-gather":
        arrays = arrays[-1:]
      elif start and op == "collective-permute":
        arrays = arrays[:1]
      groups = re.search(r"replica_groups=(\{\}|\{\{.*?\}\}|\[[^\s,]*(?:,[^\s,]*)*"
                         r"|mesh\[[^\]]*\]\s*\{[^}]*\})", rest)
      groups = groups.group(1) if groups else ""
      if op == "collective-permute":
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", rest)
        ids = [int(x) for x in re.findall(r"\d+", pairs.group(1))] if pairs else []
        n, lists = 2, [ids]
      else:
        n, lists = _group_devices(groups, num_partitions)
      link = "ICI"
      if num_partitions == len(slices) and len(set(slices)) > 1:
        if any(len({slices[i] for i in g if i < len(slices)}) > 1 for g in lists):
          link = "DCN"
      c = Collective(op, link, n, int(sum(arrays)), times, name, groups)
      seen[key] = c
      out.append(c)
  return Summary(out, per_slice)
