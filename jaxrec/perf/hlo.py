"""Communication and FLOP accounting read from a compiled step's HLO.

Every collective in the optimised, partitioned HLO is listed with its kind, the
mesh axes its replica groups span, its payload bytes per device and how many
times it runs per step: a collective inside a `while` body appears once in the
text, so it is multiplied by the loop's `known_trip_count` (nested loops
multiply). XLA's own `cost_analysis()` counts loop bodies once, so matmul FLOPs
are recounted here the same way.

Replica-group ids in SPMD HLO are positions in the mesh's flattened device
order, which is how groups are mapped back to mesh axes.

Branches of a conditional run on some devices and some steps only. Programs name
their conditionals (`jax.named_scope`) and say how often each branch runs on an
average device (`branch_weights`: scope name -> weight per branch index); the
accounting then reports per-device averages. Collectives in unnamed conditionals
are counted as if every branch ran and flagged `in_conditional` (an upper bound).
A collective-permute in which only some devices send counts the senders' share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
from jax.sharding import Mesh

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
    "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
}

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,\s]*\},?\s*)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](T\(([0-9,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_GEMM_TARGET = re.compile(r'custom_call_target="[^"]*(gemm|matmul)[^"]*"', re.IGNORECASE)
_GEMM_CONTRACT = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  op: str
  rest: str


@dataclasses.dataclass
class Computation:
  name: str
  params: dict[str, str]
  instructions: list[Instruction]


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  axes: tuple[str, ...]     # mesh axes the group spans; () = no communication
  bytes: int                # payload per device per execution (see `payload_bytes`)
  count: float              # executions per step (trip counts and branch weights applied)
  group_size: int
  dtypes: tuple[str, ...]
  name: str
  op_name: str
  in_conditional: bool = False  # inside a lax.cond/switch branch: an upper bound
  shapes: tuple[tuple[int, ...], ...] = ()
  participation: float = 1.0    # share of devices that send (collective-permute)

  @property
  def total_bytes(self) -> float:
    return self.bytes * self.count * self.participation

  @property
  def wire_bytes(self) -> float:
    """Bytes each device sends per step under ring algorithms."""
    n = self.group_size
    if n <= 1:
      return 0.0
    factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
              "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n,
              "collective-permute": 1.0}[self.kind]
    return factor * self.total_bytes


def parse_module(text: str) -> dict[str, Computation]:
  comps: dict[str, Computation] = {}
  current: Computation | None = None
  for line in text.splitlines():
    if current is None:
      m = _COMP_HEADER.match(line.strip())
      if m:
        params = {}
        for p in _split_top(m.group(3)):
          if ":" in p:
            pname, pshape = p.split(":", 1)
            params[pname.strip().lstrip("%")] = pshape.strip()
        current = Computation(m.group(2), params, [])
        if m.group(1):
          comps["__entry__"] = current
      continue
    if line.strip() == "}":
      comps[current.name] = current
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      current.instructions.append(Instruction(m.group(2), m.group(3), m.group(4), m.group(5)))
  return comps


def multipliers(comps: dict[str, Computation], branch_weights: dict[str, list[float]] | None = None
                ) -> dict[str, tuple[float, bool]]:
  """computation -> (executions per step, reached through an unweighted conditional).

  Executions add up over call sites (a computation may be called from several
  places), so the call graph is walked in topological order.
  """
  entry = comps["__entry__"].name
  edges: dict[str, list[tuple[str, float, bool]]] = defaultdict(list)
  for name, comp in comps.items():
    if name == "__entry__":
      continue
    for ins in comp.instructions:
      trip = _TRIP.search(ins.rest)
      for role, callee in _CALLEES.findall(ins.rest):
        if role == "to_apply" and ins.op not in ("call", "map"):
          continue  # reduction bodies: scalar helpers
        factor = int(trip.group(1)) if (trip and role == "body") else 1
        edges[name].append((callee, float(factor), role.endswith("_computation")))
      for branch_list in _BRANCHES.findall(ins.rest):
        callees = re.findall(r"%([\w.\-]+)", branch_list)
        weights = _weights_for(ins.rest, branch_weights, len(callees))
        for k, callee in enumerate(callees):
          edges[name].append((callee, 1.0 if weights is None else weights[k], weights is None))
  reachable, stack = {entry}, [entry]
  while stack:
    for callee, _, _ in edges[stack.pop()]:
      if callee in comps and callee not in reachable:
        reachable.add(callee)
        stack.append(callee)
  indegree = {n: 0 for n in reachable}
  for n in reachable:
    for callee, _, _ in edges[n]:
      if callee in indegree:
        indegree[callee] += 1
  result: dict[str, tuple[float, bool]] = {n: (0.0, False) for n in reachable}
  result[entry] = (1.0, False)
  queue = [n for n, d in indegree.items() if d == 0]
  while queue:
    n = queue.pop()
    mult, cond = result[n]
    for callee, factor, unweighted in edges[n]:
      if callee not in indegree:
        continue
      m, c = result[callee]
      result[callee] = (m + mult * factor, c or cond or unweighted)
      indegree[callee] -= 1
      if indegree[callee] == 0:
        queue.append(callee)
  return result


def _weights_for(rest: str, branch_weights, n: int) -> list[float] | None:
  if not branch_weights:
    return None
  op_name = _OP_NAME.search(rest)
  if not op_name:
    return None
  path = op_name.group(1) + "/"
  # the innermost named scope around this conditional decides
  found = [(path.rfind(f"/{scope}/"), weights) for scope, weights in branch_weights.items()
           if f"/{scope}/" in path]
  if not found:
    return None
  _, weights = max(found, key=lambda f: f[0])
  return list(weights) if len(weights) == n else None


NARROW = ("bf16", "f16")


_PRE_COLLECTIVE = re.compile(rf"=\s*(.*?)\s+({'|'.join(KINDS)})(?:-start)?\(")

ProgramCollective = tuple[str, tuple[int, ...], str]   # (op_name, shape, dtype)


def program_collectives(text: str) -> list[ProgramCollective]:
  """The collectives of a pre-optimization HLO module
  (`lowered.as_text(dialect="hlo", debug_info=True)`) with the dtypes the program
  asked for. Their op_names are relative to the enclosing computation."""
  out = []
  for line in text.splitlines():
    m = _PRE_COLLECTIVE.search(line)
    op_name = _OP_NAME.search(line)
    if m and op_name:
      out += [(op_name.group(1), shape, dt) for dt, shape in _arrays(m.group(1))]
  return out


def _narrowed(arrays: list[tuple[str, tuple[int, ...]]], op_name: str,
              program: list[ProgramCollective]) -> list[tuple[str, tuple[int, ...]]]:
  """The compiled collective's arrays at the program's dtypes. XLA's CPU backend
  computes bf16 collectives in f32 (it renames their reductions `*_promoted` and
  converts around them), so a CPU-compiled module shows twice the bytes a GPU or
  TPU moves for them. An f32 array is counted narrow when the program's collectives
  of that shape whose op_name ends like this one (same primitive; the longest
  matching name wins) are all narrow."""
  if not program or any(dt != "f32" for dt, _ in arrays):
    return arrays
  last = op_name.rsplit("/", 1)[-1]
  out = []
  for dt, shape in arrays:
    same = [(name, d) for name, s, d in program
            if s == shape and name.rsplit("/", 1)[-1] == last]
    suffixes = [(name, d) for name, d in same if op_name.endswith(name)]
    if suffixes:
      longest = max(len(name) for name, _ in suffixes)
      same = [(name, d) for name, d in suffixes if len(name) == longest]
    asked = {d for _, d in same}
    out.append((asked.pop() if len(asked) == 1 and asked <= set(NARROW) else dt, shape))
  return out


def collectives(text: str, mesh: Mesh, branch_weights: dict[str, list[float]] | None = None,
                program_text: str | None = None) -> list[Collective]:
  """Every collective of a compiled module, per device and step. `program_text`: the
  pre-optimization module, to count collectives at the program's dtypes (see
  `_narrowed`); without it, at the compiled ones."""
  program = program_collectives(program_text) if program_text else []
  comps = parse_module(text)
  mult = multipliers(comps, branch_weights)
  coords = _device_coords(mesh)
  out = []
  for cname, comp in comps.items():
    if cname == "__entry__" or cname not in mult:
      continue
    count, cond = mult[cname]
    for ins in comp.instructions:
      kind = ins.op[:-6] if ins.op.endswith("-start") else ins.op
      if kind not in KINDS:
        continue
      op_name = _OP_NAME.search(ins.rest)
      arrays = _narrowed(_arrays(ins.shape), op_name.group(1) if op_name else "", program)
      payload = payload_bytes(kind, ins.op.endswith("-start"), arrays, ins.rest)
      axes, size = _axes_of(ins.rest, kind, coords, mesh)
      share = 1.0
      if kind == "collective-permute":
        pairs = _PAIRS.search(ins.rest)
        share = (len(re.findall(r"\{\d+,\d+\}", pairs.group(1))) / coords.shape[0]
                 if pairs else 0.0)
      out.append(Collective(kind, axes, int(payload), count, size,
                            tuple(sorted({a[0] for a in arrays})), ins.name,
                            op_name.group(1) if op_name else "", cond,
                            tuple(a[1] for a in arrays), share))
  return out


def payload_bytes(kind: str, is_start: bool, arrays: list[tuple[str, tuple[int, ...]]],
                  rest: str) -> float:
  """Buffer bytes per device: the reduced buffer for all-reduce, the gathered (full)
  buffer for all-gather, the full input for reduce-scatter, the sent buffer for
  all-to-all and collective-permute."""
  sizes = [DTYPE_BYTES.get(dt, 4) * math.prod(shape) for dt, shape in arrays]
  if is_start and kind in ("all-gather", "collective-permute") and len(sizes) >= 2:
    # async start ops return (operand(s), result(s), [sync flags]): keep the results
    arrays_big = [s for (dt, _), s in zip(arrays, sizes) if dt not in ("u32", "s32")] or sizes
    half = len(arrays_big) // 2
    sizes = arrays_big[half:] if kind == "all-gather" else arrays_big[:half]
  total = float(sum(sizes))
  if kind == "reduce-scatter":
    groups = _group_size_from(rest)
    total *= groups
  return total


def _group_size_from(rest: str) -> int:
  m = _GROUPS_IOTA.search(rest)
  if m:
    return int(m.group(1).split(",")[-1])
  m = _GROUPS_LIST.search(rest)
  if m:
    first = re.search(r"\{([0-9,\s]*)\}", m.group(1))
    return len([x for x in first.group(1).split(",") if x.strip()]) if first else 1
  return 1


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(shape) if dt in DTYPE_BYTES]


def _device_coords(mesh: Mesh) -> np.ndarray:
  """logical device position -> mesh coordinates [num_devices, ndim]."""
  return np.stack(np.unravel_index(np.arange(mesh.devices.size), mesh.devices.shape), -1)


def _replica_groups(rest: str) -> list[list[int]] | None:
  m = _GROUPS_IOTA.search(rest)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    reshape = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(shape).tolist()
  m = _GROUPS_LIST.search(rest)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([0-9,\s]*)\}", m.group(1))]
    return [g for g in groups if g] or None
  return None


def _axes_of(rest: str, kind: str, coords: np.ndarray, mesh: Mesh) -> tuple[tuple[str, ...], int]:
  names = mesh.axis_names
  if kind == "collective-permute":
    m = _PAIRS.search(rest)
    pairs = [tuple(int(v) for v in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}",
                                                                      m.group(1))] if m else []
    varying = set()
    for s, t in pairs:
      varying |= {names[i] for i in np.flatnonzero(coords[s] != coords[t])}
    size = 2 if pairs and any(s != t for s, t in pairs) else 1
    return tuple(a for a in names if a in varying), size
  groups = _replica_groups(rest)
  if groups is None:  # no groups: every device participates
    groups = [list(range(coords.shape[0]))]
  group = groups[0]
  if len(group) <= 1:
    return (), 1
  sub = coords[group]
  varying = [names[i] for i in range(len(names)) if len(set(sub[:, i].tolist())) > 1]
  return tuple(varying), len(group)


def axis_key(axes: Iterable[str]) -> str:
  axes = tuple(axes)
  return ",".join(axes) if axes else "none"


def bytes_by_axis(colls: list[Collective], wire: bool = False) -> dict[str, float]:
  """Bytes per step per (average) device by the axes crossed."""
  out: dict[str, float] = defaultdict(float)
  for c in colls:
    if c.axes:
      out[axis_key(c.axes)] += c.wire_bytes if wire else c.total_bytes
  return dict(out)


def aggregate(colls: list[Collective]) -> list[dict[str, Any]]:
  """Collectives grouped by (kind, axes, bytes): what the report lists."""
  groups: dict[tuple, dict[str, Any]] = {}
  for c in colls:
    key = (c.kind, c.axes, c.bytes, c.in_conditional, c.participation)
    g = groups.setdefault(key, {"kind": c.kind, "axes": list(c.axes), "bytes": c.bytes,
                                "count": 0, "total_bytes": 0, "wire_bytes": 0.0,
                                "group_size": c.group_size, "dtypes": list(c.dtypes),
                                "participation": c.participation,
                                "in_conditional": c.in_conditional, "example": c.op_name})
    g["count"] += c.count
    g["total_bytes"] += c.total_bytes
    g["wire_bytes"] += c.wire_bytes
  return sorted(groups.values(), key=lambda g: -g["total_bytes"])


def dot_flops(text: str, branch_weights: dict[str, list[float]] | None = None) -> float:
  """2*M*N*K summed over every matmul, loop bodies multiplied by their trip counts.

  Matmuls are `dot` ops, and on GPU also the GEMM custom calls XLA lowers dots to
  (cuBLAS / cuBLASLt: `custom_call_target="__cublas$gemm"` and friends), whose
  contracting dimensions sit in the backend config."""
  comps = parse_module(text)
  mult = multipliers(comps, branch_weights)
  total = 0.0
  for cname, comp in comps.items():
    if cname == "__entry__" or cname not in mult:
      continue
    shapes = dict(comp.params)
    for ins in comp.instructions:
      shapes[ins.name] = ins.shape
    for ins in comp.instructions:
      if ins.op == "dot":
        contract = _CONTRACT.search(ins.rest)
      elif ins.op == "custom-call" and _GEMM_TARGET.search(ins.rest):
        contract = _GEMM_CONTRACT.search(ins.rest)
      else:
        continue
      out = _arrays(ins.shape)
      operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
      if not out or not operands or not contract:
        continue
      lhs = _arrays(shapes.get(operands[0], ""))
      if not lhs:
        continue
      dims = [int(d) for d in re.findall(r"\d+", contract.group(1))]
      k = math.prod(lhs[0][1][d] for d in dims)
      total += 2.0 * math.prod(out[0][1]) * k * mult[cname][0]
  return total


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  stats = {k: int(getattr(m, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes")}
  stats["peak_memory_bytes"] = (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
                                - stats["alias_size_in_bytes"] + stats["temp_size_in_bytes"])
  return stats


def analyze(compiled, mesh: Mesh, branch_weights: dict[str, list[float]] | None = None,
            scopes: Iterable[str] = (), program_text: str | None = None) -> dict[str, Any]:
  """Per-(average-)device accounting of one compiled step; `scopes`: name scopes whose
  collectives' wire bytes are also reported on their own (forward and transposed);
  `program_text`: the pre-optimization module (collectives at the program's dtypes)."""
  text = compiled.as_text()
  colls = collectives(text, mesh, branch_weights, program_text)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  mem = memory_stats(compiled)
  return {
      "collectives": aggregate(colls),
      "bytes_by_axis": bytes_by_axis(colls),
      "wire_bytes_by_axis": bytes_by_axis(colls, wire=True),
      "unweighted_conditionals": any(c.in_conditional for c in colls),
      "wire_bytes_by_scope": {s: sum(c.wire_bytes for c in colls if s in c.op_name)
                              for s in scopes},
      "flops": dot_flops(text, branch_weights),
      "xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
      "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "peak_memory_bytes": mem.get("peak_memory_bytes", 0),
      "memory": mem,
  }


def _split_top(s: str) -> list[str]:
  """Splits on commas not nested in brackets/braces/parentheses."""
  parts, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    parts.append("".join(cur))
  return parts


def to_json(report: dict[str, Any]) -> str:
  return json.dumps(report, indent=2, sort_keys=True, default=float)
