"""Pipeline parallelism over the `pipe` axis in one SPMD program: GPipe, 1F1B and
interleaved schedules from one table-driven executor.

A schedule is a plain table: for every tick and every pipe device, one op —
forward or backward of (microbatch, virtual stage) — or idle. Tables come from
simulating each device's op sequence (all forwards then all backwards for GPipe;
warm-up / one-forward-one-backward / cool-down for 1F1B and Megatron's interleaved
order), executing an op as soon as its inputs have arrived. The executor, the
bubble report and the timeline plots all read the same table.

The executor unrolls the ticks. At each tick every device runs `lax.switch` on
its own op (forward: store this microbatch's VJP residuals in a slot; backward:
rebuild the VJP from the slot and apply it to the arrived cotangent), then one
`ppermute` forward and one backward move activations and cotangents — listing
only the devices that actually send at that tick, so the pipe axis carries
exactly the activations the schedule needs. Virtual stage 0 also embeds; the last
one also computes the loss and its gradient right away, so the logits are never
stored. Uneven stages are padded to the longest with inactive layer slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.parallel.vma import make_varying, varying_axes

IDLE, F_FIRST, F_MID, F_LAST, B_FIRST, B_REST = range(6)
OP_NAMES = ("idle", "F_first", "F", "F_last", "B_first", "B")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


class PipelineConfigError(ValueError):
  pass


# ---------------------------------------------------------------------------
# Layer layout: which layer lives in which slot of which device.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageLayout:
  """Layers of the model assigned to P x V virtual stages (V chunks per device).

  Virtual stage s = v * P + d runs on pipe device d as its chunk v (round-robin,
  Megatron-style). Stacked layer params are stored slot-major: slot
  g = d * (V * Lmax) + v * Lmax + l holds the l-th layer of stage s (or padding
  when that stage has fewer than Lmax layers), so sharding the slot axis over
  `pipe` gives each device exactly its chunks.
  """
  n_layers: int
  pipe: int
  virtual: int
  layers_per_stage: tuple[int, ...]

  @classmethod
  def build(cls, n_layers: int, pipe: int, virtual: int = 1,
            layers_per_stage: str | Sequence[int] = "uniform") -> "StageLayout":
    stages = pipe * virtual
    if isinstance(layers_per_stage, str):
      if layers_per_stage != "uniform":
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {layers_per_stage!r}; use 'uniform', "
            f"'auto' or a list of {stages} layer counts")
      if n_layers % stages:
        raise PipelineConfigError(
            f"{n_layers} layers do not split evenly over pipe x virtual_stages = "
            f"{pipe} x {virtual} = {stages} stages; give config.pipeline.layers_per_stage "
            f"as a list of {stages} counts summing to {n_layers}")
      counts = (n_layers // stages,) * stages
    else:
      counts = tuple(int(c) for c in layers_per_stage)
      if len(counts) != stages:
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)} has {len(counts)} entries; "
            f"the mesh and virtual_stages need {stages} (pipe {pipe} x virtual {virtual})")
      if any(c < 1 for c in counts):
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)}: every stage needs >= 1 layer")
      if sum(counts) != n_layers:
        raise PipelineConfigError(
            f"config.pipeline.layers_per_stage = {list(counts)} covers {sum(counts)} layers "
            f"but the model has {n_layers}")
    return cls(n_layers, pipe, virtual, counts)

  @property
  def stages(self) -> int:
    return self.pipe * self.virtual

  @property
  def slots_per_chunk(self) -> int:
    return max(self.layers_per_stage)

  @property
  def num_slots(self) -> int:
    return self.stages * self.slots_per_chunk

  @property
  def padded(self) -> bool:
    return len(set(self.layers_per_stage)) > 1

  def active_fraction(self) -> float:
    return self.n_layers / self.num_slots

  def slot_layer(self) -> np.ndarray:
    """Layer index per slot [P * V * Lmax] (-1 = padding)."""
    lmax, starts = self.slots_per_chunk, np.cumsum((0,) + self.layers_per_stage)
    out = np.full((self.pipe, self.virtual, lmax), -1, np.int32)
    for d in range(self.pipe):
      for v in range(self.virtual):
        s = v * self.pipe + d
        n = self.layers_per_stage[s]
        out[d, v, :n] = starts[s] + np.arange(n)
    return out.reshape(-1)

  def to_slots(self, layers: Any) -> Any:
    """Canonical stacked layers [L, ...] -> slot layout [P*V*Lmax, ...] (padding = 0)."""
    idx = self.slot_layer()
    take = jnp.asarray(np.maximum(idx, 0))
    valid = jnp.asarray(idx >= 0)

    def leaf(x):
      rows = jnp.take(x, take, axis=0)
      return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), rows, 0)
    return jax.tree.map(leaf, layers)

  def to_canonical(self, slots: Any) -> Any:
    """Slot layout -> canonical [L, ...] (drops padding slots)."""
    idx = self.slot_layer()
    where = np.argsort(np.where(idx >= 0, idx, np.iinfo(np.int32).max))[:self.n_layers]
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(where), axis=0), slots)

  def slot_shapes(self, layer_shapes: Any) -> Any:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((self.num_slots, *s.shape[1:]), s.dtype), layer_shapes)

  def device_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """(layer ids, active) per device, chunk and slot: [P, V, Lmax] each."""
    idx = self.slot_layer().reshape(self.pipe, self.virtual, self.slots_per_chunk)
    return np.maximum(idx, 0), idx >= 0


# ---------------------------------------------------------------------------
# Schedules as tables.
# ---------------------------------------------------------------------------
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

  def branch_weights(self) -> dict[str, list[float]]:
    """Per tick with a `lax.switch`: the share of devices running each branch (in the
    executor's branch order) — what an average device executes, for HLO accounting."""
    out = {}
    for t, row in enumerate(self.ops):
      codes = [self.op_code(op) for op in row]
      present = sorted(set(codes))
      if len(present) > 1:
        out[tick_scope(t)] = [codes.count(c) / self.pipe for c in present]
    return out

  def senders(self, t: int) -> tuple[list[int], list[int]]:
    """Devices that send an activation forward / a cotangent backward at tick t."""
    fwd = [d for d, op in enumerate(self.ops[t])
           if op and op.kind == "F" and op.stage < self.stages - 1]
    bwd = [d for d, op in enumerate(self.ops[t]) if op and op.kind == "B" and op.stage > 0]
    return fwd, bwd


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


# ---------------------------------------------------------------------------
# The executor (runs inside shard_map, per device).
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StagePieces:
  """The model as the pipeline sees it (pure functions over local shards).

  embed(shared, ids [mb, T], keys) -> x [mb, T, D]
  stage(chunk_params, x, aux) -> y, aux = (ids, layer_ids [Lmax], active [Lmax], keys)
  head(view, y, mb_batch) -> scalar loss contribution (training) or per-row outputs
  head_view(shared) -> view: the params the head reads (the spread head: this
       stage's slice of the item table), and accumulate_head(g_shared, d_view) adds
       their gradient back without a table-sized pass.
  lookup(shared, ids) -> rows, embed_rows(shared, rows, ids, keys) -> x and
       accumulate_lookup(g_table, ids, d_rows) -> g_table: when given, the
       embedding's gradient is scatter-added into the table accumulator in place
       (its gradient touches only the looked-up rows) instead of being formed densely.
  """
  embed: Callable[..., jax.Array]
  stage: Callable[..., jax.Array]
  head: Callable[..., Any]
  head_view: Callable[[Any], Any] = lambda shared: shared
  accumulate_head: Callable[[Any, Any], Any] | None = None
  lookup: Callable[..., jax.Array] | None = None
  embed_rows: Callable[..., jax.Array] | None = None
  accumulate_lookup: Callable[..., jax.Array] | None = None


def run(schedule: Schedule, layout: StageLayout, pieces: StagePieces, stage_params: Any,
        shared_params: Any, microbatches: dict[str, jax.Array], keys: jax.Array | None,
        axis: str = "pipe", remat: bool = False, vary_axes: Sequence[str] = (),
        head_spread: bool = False):
  """Executes `schedule` on this device.

  head_spread: the item-softmax head of each microbatch runs on every stage (each
  scoring its share of the catalogue; `pieces.head` must reduce over `axis`)
  instead of on the last stage alone: the finished microbatch is broadcast over
  `axis` on the tick it leaves the last stage.

  microbatches: arrays with a leading [M] microbatch axis (at least "inputs").
  keys: raw dropout key data [M, mb, 2] or None.
  vary_axes: mesh axes every buffer varies over besides `axis` (the data axes).
  Training returns (loss on the last stage else 0, stage-param grads, shared grads);
  forward-only returns the per-microbatch head outputs [M, ...] (last stage only).

  The per-slot buffers (stage inputs, residuals, cotangents) and the gradient
  accumulators never pass through the `lax.switch`: each tick reads one slot
  before it, the branch returns what to write, and the write happens after it, so
  XLA updates the buffers in place instead of copying them through conditionals.
  Writes of ops that do not produce a value go to a spare slot.
  """
  table = {k: jnp.asarray(v) for k, v in schedule.table().items()}
  np_table = schedule.table()
  me = lax.axis_index(axis)
  layer_ids, active = (jnp.asarray(a) for a in layout.device_tables())
  layer_ids, active = layer_ids[me], active[me]
  lmax = layout.slots_per_chunk
  vary = (axis, *vary_axes)
  ids = microbatches["inputs"]
  training = not schedule.forward_only
  store_residuals = training and not remat

  def chunk(tree, v):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, v * lmax, lmax, 0), tree)

  def aux_for(i, v):
    return (ids[i], layer_ids[v], active[v] if layout.padded else None,
            None if keys is None else keys[i])

  def embed(sp, i):
    return pieces.embed(sp, ids[i], None if keys is None else keys[i])

  # Probe one stage VJP abstractly: residual shapes, varying axes and where the
  # params sit among the residuals (they are not stored per slot).
  probe: dict[str, Any] = {}

  def probe_fn(params, x, aux):
    _, vjp_fn = jax.vjp(pieces.stage, params, x, aux)
    leaves, probe["treedef"] = jax.tree.flatten(vjp_fn)
    probe["param_at"] = _param_positions(leaves, params)
    probe["vary"] = [varying_axes(leaf) for leaf in leaves]
    return [leaf for leaf, at in zip(leaves, probe["param_at"]) if at < 0]

  x_shape = jax.eval_shape(lambda: embed(shared_params, 0))
  x_zero = make_varying(jnp.zeros(x_shape.shape, x_shape.dtype), vary)
  res_shapes = jax.eval_shape(probe_fn, chunk(stage_params, 0), x_zero,
                              aux_for(0, 0)) if store_residuals else []
  res_zero = [make_varying(jnp.zeros(r.shape, r.dtype), set(vary) | v)
              for r, v in zip(res_shapes, [v for v, at in zip(probe.get("vary", []),
                                                          probe.get("param_at", []))
                                           if at < 0])]
  spare = max(schedule.num_slots, 1)   # one extra slot takes writes of idle ops

  def buffer(zero):
    return jnp.broadcast_to(zero, (spare + 1, *zero.shape))

  act = buffer(x_zero)
  ct = buffer(x_zero.astype(jnp.float32))
  res = [buffer(z) for z in res_zero]
  chunk_zero = jax.tree.map(jnp.zeros_like, chunk(stage_params, 0))
  shared_zero = jax.tree.map(jnp.zeros_like, shared_params)
  other_params = {k: v for k, v in shared_params.items() if k != "items"}
  other_zero = jax.tree.map(jnp.zeros_like, other_params)
  if training:
    g_stage = make_varying(jax.tree.map(jnp.zeros_like, stage_params), vary)
    g_shared = make_varying(shared_zero, vary)
    loss = make_varying(jnp.zeros((), jnp.float32), vary)
  else:
    out_shape = jax.eval_shape(lambda: pieces.head(
        pieces.head_view(shared_params), x_zero, {k: v[0] for k, v in microbatches.items()}))
    out = make_varying(jnp.zeros((schedule.microbatches + 1, *out_shape.shape),
                                 out_shape.dtype), vary)

  p = schedule.pipe
  for t in range(schedule.ticks):
    row = {k: v[t, me] for k, v in table.items()}
    codes = sorted(set(np_table["op"][t].tolist()))
    has = {c: c in codes for c in range(len(OP_NAMES))}
    any_f = has[F_FIRST] or has[F_MID] or has[F_LAST]
    any_b = has[B_FIRST] or has[B_REST]
    slot = row["slot"]
    # What this tick's branches return; a template of zeros fixes shapes and types.
    template = {"send_f": x_zero, "send_b": x_zero}
    if store_residuals and any_f:
      template["res"] = res_zero
    if remat and has[F_FIRST]:
      template["x"] = x_zero
    if training and any_b:
      template["d_chunk"] = chunk_zero
    sparse_embed = pieces.lookup is not None
    if training and ((has[F_LAST] and not head_spread) or (has[B_FIRST] and not sparse_embed)):
      template["d_shared"] = shared_zero
    if training and has[B_FIRST] and sparse_embed:
      template["d_rows"] = x_zero
      template["d_other"] = other_zero
    if has[F_LAST] and head_spread:
      template["y_last"] = x_zero
    elif training and has[F_LAST]:
      template["loss"] = make_varying(jnp.zeros((), jnp.float32), vary)
      template["ct"] = x_zero.astype(jnp.float32)
    elif has[F_LAST]:
      template["out"] = out[0]
    reads = {"x": act[slot]}
    if training and any_b:
      reads["ct"] = ct[slot]
      if store_residuals:
        reads["res"] = [r[slot] for r in res]

    def branch(code, reads, row, template=template):
      result = dict(template)
      i, v = row["mb"], row["chunk"]
      if code == IDLE:
        return _match(result, template)
      params = chunk(stage_params, v)
      aux = aux_for(i, v)
      if code in (F_FIRST, F_MID, F_LAST):
        x = embed(shared_params, i) if code == F_FIRST else reads["x"]
        if store_residuals:
          y, vjp_fn = jax.vjp(pieces.stage, params, x, aux)
          leaves = jax.tree.leaves(vjp_fn)
          if _param_positions(leaves, params) != probe["param_at"]:
            raise AssertionError("stage VJP residuals differ from the probe's structure")
          result["res"] = [leaf for leaf, at in zip(leaves, probe["param_at"]) if at < 0]
        else:
          y = pieces.stage(params, x, aux)
        if "x" in result and code == F_FIRST:
          result["x"] = x
        if code != F_LAST:
          result["send_f"] = y
        elif head_spread:
          result["y_last"] = y
        else:
          batch = {k: val[i] for k, val in microbatches.items()}
          if training:
            value, head_vjp = jax.vjp(
                lambda sp, y: pieces.head(pieces.head_view(sp), y, batch), shared_params, y)
            d_shared, d_y = head_vjp(jnp.ones_like(value))
            result.update(loss=value, d_shared=d_shared, ct=d_y)
          else:
            result["out"] = pieces.head(pieces.head_view(shared_params), y, batch)
        return _match(result, template)
      # backward
      if remat:
        _, vjp_fn = jax.vjp(pieces.stage, params, reads["x"], aux)
      else:
        param_leaves = jax.tree.leaves(params)
        stored = iter(reads["res"])
        vjp_fn = jax.tree.unflatten(probe["treedef"], [
            param_leaves[at] if at >= 0 else next(stored) for at in probe["param_at"]])
      d_params, d_x, _ = vjp_fn(reads["ct"].astype(x_shape.dtype))
      result["d_chunk"] = d_params
      if code == B_FIRST and sparse_embed:
        rows = pieces.lookup(shared_params, ids[i])
        k = None if keys is None else keys[i]
        _, embed_vjp = jax.vjp(
            lambda other, r: pieces.embed_rows({**shared_params, **other}, r, ids[i], k),
            other_params, rows)
        result["d_other"], result["d_rows"] = embed_vjp(d_x)
      elif code == B_FIRST:
        _, embed_vjp = jax.vjp(lambda sp: embed(sp, i), shared_params)
        (result["d_shared"],) = embed_vjp(d_x)
      else:
        result["send_b"] = d_x
      return _match(result, template)

    with jax.named_scope(tick_scope(t)):
      if len(codes) == 1:
        got = branch(codes[0], reads, row)
      else:
        position = np.zeros(len(OP_NAMES), np.int32)
        position[codes] = np.arange(len(codes))
        got = lax.switch(jnp.asarray(position)[row["op"]],
                         [functools.partial(branch, c) for c in codes], reads, row)
    op = row["op"]
    is_f = (op == F_FIRST) | (op == F_MID) | (op == F_LAST)
    if "res" in got:
      at = jnp.where(is_f, slot, spare)
      res = [lax.dynamic_update_index_in_dim(b, r.astype(b.dtype), at, 0)
             for b, r in zip(res, got["res"])]
    if "x" in got:
      act = lax.dynamic_update_index_in_dim(
          act, got["x"], jnp.where(op == F_FIRST, slot, spare), 0)
    if "d_chunk" in got:
      is_b = (op == B_FIRST) | (op == B_REST)
      start = jnp.where(is_b, row["chunk"], 0) * lmax
      g_stage = jax.tree.map(
          lambda g, d: lax.dynamic_update_slice_in_dim(
              g, lax.dynamic_slice_in_dim(g, start, lmax, 0) + d, start, 0),
          g_stage, got["d_chunk"])
    if "d_shared" in got:
      g_shared = jax.tree.map(jnp.add, g_shared, got["d_shared"])
    if "d_rows" in got:   # rows of ops other than B_FIRST are zero: adding them is a no-op
      g_shared = {**g_shared, **jax.tree.map(jnp.add, {k: g_shared[k] for k in other_params},
                                              got["d_other"])}
      g_shared["items"] = {**g_shared["items"], "table": pieces.accumulate_lookup(
          g_shared["items"]["table"], ids[row["mb"]], got["d_rows"])}
    if "loss" in got:
      loss = loss + got["loss"]
      ct = lax.dynamic_update_index_in_dim(
          ct, got["ct"], jnp.where(op == F_LAST, slot, spare), 0)
    if "out" in got:
      out = lax.dynamic_update_index_in_dim(
          out, got["out"], jnp.where(op == F_LAST, row["mb"], schedule.microbatches), 0)
    if "y_last" in got:  # the spread head: every stage scores its share of the catalogue
      done = op == F_LAST
      y_all = lax.psum(jnp.where(done, got["y_last"], 0).astype(jnp.float32), axis)
      y_all = y_all.astype(x_shape.dtype)
      i_all = lax.psum(jnp.where(done, row["mb"], 0), axis)
      batch = {k: val[i_all] for k, val in microbatches.items()}
      view = pieces.head_view(shared_params)
      if training:
        value, head_vjp = jax.vjp(lambda v, y: pieces.head(v, y, batch), view, y_all)
        d_view, d_y = head_vjp(jnp.ones_like(value))
        loss = loss + jnp.where(me == p - 1, value, 0.0)   # the same value on every stage
        d_view = make_varying(d_view, vary)
        g_shared = (pieces.accumulate_head(g_shared, d_view) if pieces.accumulate_head
                    else jax.tree.map(jnp.add, g_shared, d_view))
        ct = lax.dynamic_update_index_in_dim(
            ct, make_varying(d_y.astype(ct.dtype), vary), jnp.where(done, slot, spare), 0)
      else:
        value = make_varying(pieces.head(view, y_all, batch), vary)
        out = lax.dynamic_update_index_in_dim(
            out, value.astype(out.dtype), jnp.where(done, i_all, schedule.microbatches), 0)
    fwd, bwd = schedule.senders(t)
    if fwd:
      received = lax.ppermute(got["send_f"], axis, [(d, (d + 1) % p) for d in fwd])
      at = jnp.where(row["recv_f"] >= 0, row["recv_f"], spare)
      act = lax.dynamic_update_index_in_dim(act, received.astype(act.dtype), at, 0)
    if bwd:
      received = lax.ppermute(got["send_b"], axis, [(d, (d - 1) % p) for d in bwd])
      at = jnp.where(row["recv_b"] >= 0, row["recv_b"], spare)
      ct = lax.dynamic_update_index_in_dim(ct, received.astype(ct.dtype), at, 0)
  if not training:
    return out[:schedule.microbatches]
  return loss, g_stage, g_shared


def _param_positions(leaves: list, params: Any) -> list[int]:
  """For each VJP residual leaf: its index among the params' leaves, or -1."""
  param_leaves = jax.tree.leaves(params)
  return [next((k for k, q in enumerate(param_leaves) if leaf is q), -1) for leaf in leaves]


def _match(values: dict, template: dict) -> dict:
  """Casts each value to its template's dtype and varying axes (branch outputs of a
  switch must agree exactly)."""
  def cast(v, t):
    v = jnp.asarray(v).astype(t.dtype)
    return make_varying(v, varying_axes(t))
  return jax.tree.map(cast, values, template)


def tick_scope(t: int) -> str:
  return f"pipeline_tick_{t}"


def parse_layers_per_stage(value: str | Sequence[int]) -> str | tuple[int, ...]:
  """'uniform', 'auto', or layer counts as '3,3,2' / '[3, 3, 2]' / a sequence."""
  if not isinstance(value, str):
    return tuple(int(v) for v in value)
  text = value.strip().strip("[]()")
  if text in ("uniform", "auto"):
    return text
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise PipelineConfigError(
        f"config.pipeline.layers_per_stage = {value!r}; use 'uniform', 'auto' or layer "
        "counts like '3,3,2'") from None


def microbatch(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...]."""
  return x.reshape(m, x.shape[0] // m, *x.shape[1:])
