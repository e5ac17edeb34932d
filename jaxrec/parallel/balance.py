"""Adaptive load balancing of pipeline stages.

Recommender stages are not alike: the first also embeds, the last also scores
the whole item catalogue (and with a large catalogue that head can cost more
than every transformer layer together). This module measures what each piece
costs on this mesh — one transformer layer, the embedding lookup, the item
softmax head — from XLA's cost analysis of the compiled piece (FLOPs and bytes
turned into seconds by a hardware profile's roofline; for the embedding, whose
gather/scatter XLA charges for the whole table, the bytes of the rows actually
touched) or by timing it on the device, and assigns layers to (virtual) stages
by an exact dynamic programme over contiguous splits that minimises the slowest
stage.

When the head alone outweighs an even share of the work, no layer split can fix
it; `pipeline.head = "spread"` has every stage score 1/P of the catalogue for
each microbatch (parallel/pipeline/executor.py), and the balancer accounts for that.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.hardware import Hardware
from jaxrec.mesh import DATA_AXES, active_axes, mesh_shape
from jaxrec.parallel.pipeline import Schedule, StageLayout
from jaxrec.partitioning import tree_specs
from jaxrec.timing import median_seconds

Seconds = float


@dataclasses.dataclass(frozen=True)
class PieceCosts:
  """Per-microbatch costs on one device (seconds)."""
  layer_fwd: Seconds
  layer_bwd: Seconds
  embed_fwd: Seconds
  embed_bwd: Seconds
  head: Seconds               # forward + backward of the full item-softmax head
  source: str
  flops: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def layer(self) -> Seconds:
    return self.layer_fwd + self.layer_bwd

  @property
  def embed(self) -> Seconds:
    return self.embed_fwd + self.embed_bwd


def stage_costs(costs: PieceCosts, layers_per_stage: Sequence[int], pipe: int,
                head: str = "last") -> list[Seconds]:
  """Per-microbatch forward+backward seconds of each virtual stage."""
  out = []
  last = len(layers_per_stage) - 1
  for s, n in enumerate(layers_per_stage):
    c = n * costs.layer
    if s == 0:
      c += costs.embed
    if head == "spread":
      # each device scores its 1/P of the catalogue once per microbatch: charged to
      # the device's last chunk (virtual stages s >= stages - pipe)
      if s > last - pipe:
        c += costs.head / pipe
    elif s == last:
      c += costs.head
    out.append(c)
  return out


def imbalance(costs: Sequence[Seconds]) -> float:
  """max / mean: 1.0 is perfectly balanced."""
  costs = np.asarray(costs, np.float64)
  return float(costs.max() / costs.mean())


def solve(costs: PieceCosts, n_layers: int, stages: int, pipe: int,
          head: str = "last", layer_costs: Sequence[Seconds] | None = None) -> tuple[int, ...]:
  """Layer counts per virtual stage (each >= 1) minimising the slowest stage.

  Exact dynamic programme over contiguous splits: best[s][l] = the smallest
  possible max-stage-cost of putting the first l layers on the first s stages.
  `layer_costs` allows layers that differ (e.g. measured one by one).
  """
  if n_layers < stages:
    raise ValueError(f"{n_layers} layers cannot fill {stages} stages with >= 1 layer each")
  per = np.asarray(layer_costs if layer_costs is not None else [costs.layer] * n_layers)
  prefix = np.concatenate([[0.0], np.cumsum(per)])

  def extra(s):
    e = costs.embed if s == 0 else 0.0
    if head == "spread":
      if s >= stages - pipe:
        e += costs.head / pipe
    elif s == stages - 1:
      e += costs.head
    return e

  inf = float("inf")
  best = np.full((stages + 1, n_layers + 1), inf)
  cut = np.zeros((stages + 1, n_layers + 1), np.int64)
  best[0][0] = 0.0
  for s in range(1, stages + 1):
    for l in range(s, n_layers - (stages - s) + 1):
      for k in range(s - 1, l):   # stage s-1 takes layers k..l-1
        value = max(best[s - 1][k], prefix[l] - prefix[k] + extra(s - 1))
        if value < best[s][l]:
          best[s][l], cut[s][l] = value, k
  counts, l = [], n_layers
  for s in range(stages, 0, -1):
    k = cut[s][l]
    counts.append(l - k)
    l = k
  return tuple(int(c) for c in reversed(counts))


def predicted_step_time(costs: PieceCosts, schedule: Schedule, layout: StageLayout,
                        head: str = "last") -> Seconds:
  """Seconds per step from the schedule's table: devices move in lockstep, so each
  tick lasts as long as its slowest op (forward, backward, plus the spread head's
  share on ticks where a microbatch reaches the last stage)."""
  counts = layout.layers_per_stage
  last = layout.stages - 1
  total = 0.0
  for row in schedule.ops:
    tick = 0.0
    spread_here = False
    for op in row:
      if op is None:
        continue
      n = counts[op.stage]
      if op.kind == "F":
        c = n * costs.layer_fwd + (costs.embed_fwd if op.stage == 0 else 0.0)
        if op.stage == last:
          if head == "spread":
            spread_here = True
          else:
            c += costs.head
      else:
        c = n * costs.layer_bwd + (costs.embed_bwd if op.stage == 0 else 0.0)
      tick = max(tick, c)
    total += tick + (costs.head / schedule.pipe if spread_here else 0.0)
  return total


@dataclasses.dataclass(frozen=True)
class Plan:
  layers_per_stage: tuple[int, ...]
  head: str
  stage_costs: tuple[Seconds, ...]
  imbalance: float
  step_time: Seconds


def plan(costs: PieceCosts, n_layers: int, pipe: int, virtual: int, schedule: str,
         microbatches: int, heads: Sequence[str] = ("last", "spread")) -> Plan:
  """The best split for each head placement — the DP's (slowest stage minimised) or
  the uniform one — judged by the predicted step time from the schedule's table."""
  best = None
  sched = Schedule(schedule, pipe, microbatches, virtual)
  stages = pipe * virtual
  for head in heads:
    splits = {solve(costs, n_layers, stages, pipe, head)}
    if n_layers % stages == 0:
      splits.add((n_layers // stages,) * stages)
    for counts in sorted(splits):
      layout = StageLayout.build(n_layers, pipe, virtual, counts)
      per_stage = stage_costs(costs, counts, pipe, head)
      candidate = Plan(counts, head, tuple(per_stage), imbalance(per_stage),
                       predicted_step_time(costs, sched, layout, head))
      if best is None or candidate.step_time < best.step_time:
        best = candidate
  return best


def uniform_plan(costs: PieceCosts, n_layers: int, pipe: int, virtual: int, schedule: str,
                 microbatches: int, head: str = "last") -> Plan:
  layout = StageLayout.build(n_layers, pipe, virtual)
  per_stage = stage_costs(costs, layout.layers_per_stage, pipe, head)
  return Plan(layout.layers_per_stage, head, tuple(per_stage), imbalance(per_stage),
              predicted_step_time(costs, Schedule(schedule, pipe, microbatches, virtual),
                                  layout, head))


# ---------------------------------------------------------------------------
# Measuring the pieces.
# ---------------------------------------------------------------------------
def measure(fns, mesh, config, hardware: Hardware | None = None, timed: bool = False,
            repeats: int = 5) -> PieceCosts:
  """Per-microbatch piece costs of `fns` (the model's pure functions) on `mesh`.

  Compiles each piece (forward and backward, this device's shards) and converts
  XLA's FLOP and byte counts to seconds with `hardware`'s roofline, or, with
  `timed`, runs it and takes the median wall time.
  """
  shape = mesh_shape(mesh)
  data_axes = active_axes(shape, DATA_AXES)
  data = max(shape.data_size, 1)
  rows = config.train.batch_size // data // config.pipeline.microbatches
  t, d = config.data.max_len, config.model.d_model
  dtype = fns.cfg.compute_dtype
  specs = tree_specs(fns.logical_axes, shape)
  layer_specs = jax.tree.map(lambda s: P(*s[1:]), specs["layers"],
                             is_leaf=lambda x: isinstance(x, P))
  shared_specs = {k: v for k, v in specs.items() if k != "layers"}
  layer_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                              fns.shapes["layers"])
  shared_shapes = {k: v for k, v in fns.shapes.items() if k != "layers"}
  ctx = fns.context(tensor_axis="tensor" if shape.tensor > 1 else None, dropout_rate=0.0)
  ids = jax.ShapeDtypeStruct((rows * data, t), jnp.int32)
  xs = jax.ShapeDtypeStruct((rows * data, t, d), dtype)
  batch_spec = P(data_axes or None)

  def sharded(fn, in_specs, out_specs, donate=()):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False), donate_argnums=donate)

  def layer_fwd(p, x, i):
    return fns.layer(p, x, i, ctx, 0)

  def layer_bwd(p, x, i):
    y, vjp = jax.vjp(lambda p, x: layer_fwd(p, x, i), p, x)
    return vjp(jnp.ones_like(y))

  def embed_fwd(sp, i):
    return fns.embed(sp, i, ctx)

  def embed_bwd(acc, sp, i):
    # as the pipeline does it: back-propagate to the looked-up rows and scatter-add
    # them into the table's running gradient in place (touching only those rows)
    rows, lookup_vjp = jax.vjp(lambda t: fns.lookup({"items": {"table": t}}, i, ctx),
                               sp["items"]["table"])
    other = {k: v for k, v in sp.items() if k != "items"}
    y, vjp = jax.vjp(lambda o, r: fns.embed_rows({**sp, **o}, r, i, ctx), other, rows)
    d_other, d_rows = vjp(jnp.ones_like(y))
    table = acc["items"]["table"] + lookup_vjp(d_rows)[0]
    return {**jax.tree.map(jnp.add, {k: acc[k] for k in other}, d_other),
            "items": {"table": table}}

  def head(sp, h, i):
    return jax.grad(lambda sp, h: fns.head_loss(sp, h, i, ctx)[0], argnums=(0, 1))(sp, h)

  pieces = {
      "layer_fwd": (layer_fwd, (layer_specs, batch_spec, batch_spec), batch_spec,
                    (layer_shapes, xs, ids)),
      "layer_bwd": (layer_bwd, (layer_specs, batch_spec, batch_spec),
                    (layer_specs, batch_spec), (layer_shapes, xs, ids)),
      "embed_fwd": (embed_fwd, (shared_specs, batch_spec), batch_spec, (shared_shapes, ids)),
      "embed_bwd": (embed_bwd, (shared_specs, shared_specs, batch_spec), shared_specs,
                    (shared_shapes, shared_shapes, ids)),
      "head": (head, (shared_specs, batch_spec, batch_spec), (shared_specs, batch_spec),
               (shared_shapes, xs, ids)),
  }
  seconds, flops = {}, {}
  for name, (fn, in_specs, out_specs, args) in pieces.items():
    args = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        args, in_specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    donate = (0,) if name == "embed_bwd" else ()   # the accumulator is updated in place
    compiled = sharded(fn, in_specs, out_specs, donate).lower(*args).compile()
    cost = compiled.cost_analysis() or {}
    flops[name] = float(cost.get("flops", 0.0))
    if timed:
      seconds[name] = _time(compiled, args, repeats)
    else:
      peak = hardware.peak_flops if dtype == jnp.bfloat16 else hardware.peak_flops_fp32
      moved = float(cost.get("bytes accessed", 0.0))
      if name.startswith("embed"):
        # XLA's cost analysis charges a gather / in-place scatter-add for its whole
        # operand (the item table); only the looked-up rows move: read, write, and
        # for the backward a read-modify-write of the accumulator rows.
        touched = rows * t * d * jnp.dtype(dtype).itemsize
        moved = touched * (2 if name == "embed_fwd" else 4)
      seconds[name] = max(flops[name] / peak, moved / hardware.hbm_bandwidth)
  source = (f"timed on {mesh.devices.flat[0].device_kind} x{mesh.size}" if timed
            else f"XLA cost analysis, {hardware.name} roofline")
  return PieceCosts(seconds["layer_fwd"], seconds["layer_bwd"], seconds["embed_fwd"],
                    seconds["embed_bwd"], seconds["head"], source, flops)


def _time(compiled, args, repeats: int) -> Seconds:
  def make():   # fresh each call: some pieces donate their accumulator
    return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                        args, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return median_seconds(compiled, make, repeats)
