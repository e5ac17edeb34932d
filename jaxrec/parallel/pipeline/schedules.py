"""Pipeline schedules as tables: GPipe, 1F1B and interleaved (Megatron's order).

A schedule is a plain table: for every tick and every pipe device, one op —
forward or backward of (microbatch, virtual stage) — or idle. Tables come from
simulating each device's op sequence (all forwards then all backwards for GPipe;
warm-up / one-forward-one-backward / cool-down for 1F1B and Megatron's interleaved
order), executing an op as soon as its inputs have arrived. The executor, the
bubble report, the balancer and the timeline plots all read the same table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.parallel.pipeline.layout import PipelineConfigError

IDLE, F_FIRST, F_MID, F_LAST, B_FIRST, B_REST = range(6)
OP_NAMES = ("idle", "F_first", "F", "F_last", "B_first", "B")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
# Name scopes of the executor's conditionals (for the HLO accounting's branch weights).
OP_SCOPE = "pipeline_op"
SEND_SCOPES = {"forward": "pipeline_send_forward", "backward": "pipeline_send_backward"}
SPREAD_HEAD_SCOPE = "pipeline_spread_head"


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str   # "F" or "B"
  mb: int
  stage: int  # virtual stage


class Schedule:
  """A pipeline schedule as a (tick x device) table of ops, with buffer slots."""

  def __init__(self, name: str, pipe: int, microbatches: int, virtual: int = 1,
               forward_only: bool = False):
    validate_schedule(name, pipe, microbatches, virtual)
    self.name, self.pipe, self.microbatches, self.virtual = name, pipe, microbatches, virtual
    self.forward_only = forward_only
    self.stages = pipe * virtual
    self.ops = _simulate(self, [self._sequence(d) for d in range(pipe)])
    self.slot, self.num_slots = _assign_slots(self)

  # -- sequences -----------------------------------------------------------
  def device_of(self, stage: int) -> int:
    return stage % self.pipe

  def chunk_of(self, stage: int) -> int:
    return stage // self.pipe

  def _sequence(self, d: int) -> list[Op]:
    p, m, v = self.pipe, self.microbatches, self.virtual
    if self.name == "interleaved":
      order = []
      for k in range(m * v):
        group, within = divmod(k, p * v)
        order.append((group * p + within % p, within // p))
      fwd = [Op("F", i, c * p + d) for i, c in order]
      bwd = [Op("B", i, (v - 1 - c) * p + d) for i, c in order]
      warmup = min((p - d - 1) * 2 + (v - 1) * p, m * v)
    else:
      fwd = [Op("F", i, d) for i in range(m)]
      bwd = [Op("B", i, d) for i in range(m)]
      warmup = m if self.name == "gpipe" else min(p - d - 1, m)
    if self.forward_only:
      return fwd
    steady = [op for pair in zip(fwd[warmup:], bwd) for op in pair]
    return fwd[:warmup] + steady + bwd[len(fwd) - warmup:]

  # -- reports -------------------------------------------------------------
  @property
  def ticks(self) -> int:
    return len(self.ops)

  def rows(self) -> list[tuple[int, int, str, int, int]]:
    """(tick, device, op, microbatch, virtual stage) for every non-idle op."""
    return [(t, d, op.kind, op.mb, op.stage)
            for t, row in enumerate(self.ops) for d, op in enumerate(row) if op]

  def bubble_fraction(self, backward_cost: float = 1.0) -> float:
    """Idle share of device time. With `backward_cost` != 1 a tick lasts as long as
    its slowest op (devices move in lockstep in one SPMD program)."""
    total = busy = 0.0
    for row in self.ops:
      costs = [0.0 if op is None else (backward_cost if op.kind == "B" else 1.0) for op in row]
      total += max(costs) * self.pipe
      busy += sum(costs)
    return 1.0 - busy / total

  def theory_bubble(self) -> float:
    p, m, v = self.pipe, self.microbatches, self.virtual
    return (p - 1) / (v * m + p - 1)

  def op_code(self, op: Op | None) -> int:
    if op is None:
      return IDLE
    if op.kind == "F":
      return F_FIRST if op.stage == 0 else F_LAST if op.stage == self.stages - 1 else F_MID
    return B_FIRST if op.stage == 0 else B_REST

  def table(self) -> dict[str, np.ndarray]:
    """Int tables [ticks, pipe]: op code, microbatch, chunk, slot, and the slots that
    the activation / cotangent arriving at the end of the tick go to (-1: none)."""
    t_, p = self.ticks, self.pipe
    out = {k: np.zeros((t_, p), np.int32) for k in ("op", "mb", "chunk", "slot")}
    out["recv_f"] = np.full((t_, p), -1, np.int32)
    out["recv_b"] = np.full((t_, p), -1, np.int32)
    for t, row in enumerate(self.ops):
      for d, op in enumerate(row):
        if op is None:
          continue
        out["op"][t, d] = self.op_code(op)
        out["mb"][t, d] = op.mb
        out["chunk"][t, d] = self.chunk_of(op.stage)
        out["slot"][t, d] = self.slot[(op.mb, op.stage)]
        if op.kind == "F" and op.stage < self.stages - 1:
          nxt = op.stage + 1
          out["recv_f"][t, self.device_of(nxt)] = self.slot[(op.mb, nxt)]
        if op.kind == "B" and op.stage > 0:
          prev = op.stage - 1
          out["recv_b"][t, self.device_of(prev)] = self.slot[(op.mb, prev)]
    return out

  def codes(self) -> list[int]:
    """The op codes this schedule uses, ascending: the branches of the executor's switch."""
    return sorted({self.op_code(op) for row in self.ops for op in row})

  def senders(self, t: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Devices that send an activation forward / a cotangent backward at tick t."""
    fwd = tuple(d for d, op in enumerate(self.ops[t])
                if op and op.kind == "F" and op.stage < self.stages - 1)
    bwd = tuple(d for d, op in enumerate(self.ops[t])
                if op and op.kind == "B" and op.stage > 0)
    return fwd, bwd

  def send_patterns(self, direction: str) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """(pattern index per tick, distinct sender sets) for "forward" or "backward" sends.

    Pattern 0 is "nobody sends". The executor switches on the tick's pattern (the
    same on every device) to one `ppermute` listing exactly those senders, so the
    wire carries only what the schedule moves, and the program holds one permute
    per distinct pattern, not one per tick.
    """
    which = 0 if direction == "forward" else 1
    patterns: list[tuple[int, ...]] = [()]
    index = np.zeros(self.ticks, np.int32)
    for t in range(self.ticks):
      senders = self.senders(t)[which]
      if senders not in patterns:
        patterns.append(senders)
      index[t] = patterns.index(senders)
    return index, patterns

  def last_ticks(self) -> np.ndarray:
    """Per tick: does some device finish a microbatch (F on the last stage)?"""
    return np.asarray([any(op and op.kind == "F" and op.stage == self.stages - 1 for op in row)
                       for row in self.ops], bool)

  def branch_weights(self) -> dict[str, list[float]]:
    """How often each branch of the executor's conditionals runs on an average device
    per step (tick-loop trip count x share), keyed by the executor's scope names —
    what the HLO accounting multiplies collectives and FLOPs inside them by."""
    codes = self.codes()
    flat = [self.op_code(op) for row in self.ops for op in row]
    out = {OP_SCOPE: [flat.count(c) / len(flat) for c in codes]}
    directions = ("forward",) if self.forward_only else ("forward", "backward")
    for direction in directions:
      index, patterns = self.send_patterns(direction)
      out[SEND_SCOPES[direction]] = [float(np.mean(index == k)) for k in range(len(patterns))]
    last = self.last_ticks()
    out[SPREAD_HEAD_SCOPE] = [1.0 - float(last.mean()), float(last.mean())]
    return out


def validate_schedule(name: str, pipe: int, microbatches: int, virtual: int) -> None:
  if name not in SCHEDULES:
    raise PipelineConfigError(
        f"config.pipeline.schedule = {name!r}; valid schedules: {', '.join(SCHEDULES)}")
  if virtual < 1:
    raise PipelineConfigError(f"config.pipeline.virtual_stages = {virtual} must be >= 1")
  if name != "interleaved" and virtual != 1:
    raise PipelineConfigError(
        f"config.pipeline.virtual_stages = {virtual} needs schedule 'interleaved' "
        f"(got {name!r})")
  if name == "interleaved" and microbatches % pipe:
    raise PipelineConfigError(
        f"the interleaved schedule needs microbatches divisible by the pipe size: "
        f"config.pipeline.microbatches = {microbatches}, pipe = {pipe}")


def _simulate(schedule: Schedule, sequences: list[list[Op]]) -> list[list[Op | None]]:
  """Runs each device's op sequence in lockstep ticks, an op as soon as it is ready."""
  done: dict[tuple[str, int, int], int] = {}
  last = schedule.stages - 1
  pointer = [0] * schedule.pipe
  ticks: list[list[Op | None]] = []

  def ready(op: Op, t: int) -> bool:
    if op.kind == "F":
      return op.stage == 0 or done.get(("F", op.mb, op.stage - 1), t) < t
    return (done.get(("F", op.mb, op.stage), t) < t and
            (op.stage == last or done.get(("B", op.mb, op.stage + 1), t) < t))

  while any(pointer[d] < len(sequences[d]) for d in range(schedule.pipe)):
    t = len(ticks)
    row = [sequences[d][pointer[d]] if pointer[d] < len(sequences[d]) and
           ready(sequences[d][pointer[d]], t) else None for d in range(schedule.pipe)]
    if not any(row):
      raise RuntimeError(f"schedule {schedule.name} deadlocked at tick {t}")
    for d, op in enumerate(row):
      if op:
        done[(op.kind, op.mb, op.stage)] = t
        pointer[d] += 1
    ticks.append(row)
  return ticks


def _assign_slots(schedule: Schedule) -> tuple[dict[tuple[int, int], int], int]:
  """A buffer slot per (microbatch, stage) on its device: taken when the stage's
  input arrives (or when stage 0 starts), released after its backward (after its
  forward when there is no backward). The slot count is the schedule's memory."""
  free: list[list[int]] = [[] for _ in range(schedule.pipe)]
  used = [0] * schedule.pipe
  slot: dict[tuple[int, int], int] = {}

  def take(d: int, key: tuple[int, int]) -> None:
    if free[d]:
      slot[key] = free[d].pop(0)
    else:
      slot[key] = used[d]
      used[d] += 1

  for row in schedule.ops:
    for d, op in enumerate(row):
      if op and op.kind == "F" and op.stage == 0:
        take(d, (op.mb, 0))
    releases = []
    for d, op in enumerate(row):
      if op and (op.kind == "B" or schedule.forward_only):
        releases.append((d, slot[(op.mb, op.stage)]))
    for d, s in releases:
      free[d].append(s)
      free[d].sort()
    for d, op in enumerate(row):
      if op and op.kind == "F" and op.stage < schedule.stages - 1:
        take(schedule.device_of(op.stage + 1), (op.mb, op.stage + 1))
  return slot, max(used) if used else 0


