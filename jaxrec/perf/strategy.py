"""A parallel strategy as the cost model sees it: FLOPs, bytes per axis, memory.

Two sources for the same `cost_model.StepProfile`:
- `hlo_profile`: compile the real train step (abstract inputs, no arrays) on a mesh
  of (fake) devices and read FLOPs, collectives and peak memory from the HLO;
- `analytic_profile`: the textbook formulas of `perf/analytic.py` for a `Layout`
  built from a mesh shape alone — no devices needed, so pods of any size can be
  planned. Tests check the two agree (bytes within 5%) on every strategy the CPU
  can compile.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from jaxrec.config import LOCAL_MODES
from jaxrec.layout import Layout, analytic_piece_costs
from jaxrec.mesh import AXES
from jaxrec.models import flops
from jaxrec.models.embedding import row_gradient_bytes
from jaxrec.parallel import balance
from jaxrec.perf import analytic
from jaxrec.perf.cost_model import LATENCY_STEPS, CommOp, StepProfile

def analytic_volumes(lay: Layout) -> tuple[dict[str, float], dict[str, float]]:
  """(payload, ring-wire) bytes per device per step by axis key."""
  c = lay.config
  step = analytic.StepShape(
      mesh=lay.mesh, global_batch=c.train.batch_size, seq_len=c.data.max_len,
      d_model=lay.model.d_model, n_layers=lay.model.n_layers,
      act_bytes=jnp.dtype(lay.model.compute_dtype).itemsize,
      virtual_stages=lay.stages.virtual, head_spread=lay.head_spread,
      block=lay.model.block, table_data=math.prod(
          getattr(lay.mesh, a) for a in lay.table_data_axes))
  shared = {k: v for k, v in lay.param_shapes.items() if k != "layers"}
  shared_specs = {k: v for k, v in lay.param_specs.items() if k != "layers"}
  head = ()
  if lay.loss.type == "full":   # the sampled head's rows come through the table exchange
    data = ",".join(lay.table_data_axes)
    items = ",".join(a for a in AXES if a in lay.table_axes)
    head = analytic.rows_head_bytes(step, items, data)
  return analytic.analytic_bytes_by_axis(
      step, lay.grad_sync.analytic_bytes(), lay.sync_frequency,
      analytic.shard_bytes(shared, shared_specs, lay.mesh), (table_exchange(lay), *head))


def table_exchange(lay: Layout) -> tuple[str, float, float]:
  """(axis key, payload, wire) of the rows-sharded table's lookup exchange per step
  (the embedding lookup of every input position; all zero for tensor sharding)."""
  data = lay.table_data_axes
  ids = lay.local_batch * lay.config.data.max_len / (lay.mesh.pipe if lay.pipe_axis else 1)
  # rows and their gradients travel in the compute dtype (the program's collectives;
  # a CPU compile shows them in f32, see hlo._narrowed)
  row_bytes = jnp.dtype(lay.model.compute_dtype).itemsize
  return analytic.table_exchange_bytes(
      lay.mesh, ids if data else 0.0, lay.model.d_model, row_bytes, data,
      row_gradient_bytes(lay.config.embedding.row_gradients, lay.model.d_model, row_bytes))


# ---------------------------------------------------------------------------
# Pipeline lockstep: how much longer than the average busy time a step takes.
# ---------------------------------------------------------------------------
def pipeline_stretch(lay: Layout) -> float:
  """Lockstep step time / average busy time per device (1 without a pipeline): the
  bubble and the stage imbalance in one factor, read off the schedule's table."""
  if lay.schedule is None:
    return 1.0
  costs = analytic_piece_costs(lay.model, lay.loss, lay.mesh,
                               lay.local_batch // lay.microbatches)
  head = "spread" if lay.head_spread else "last"
  lockstep = balance.predicted_step_time(costs, lay.schedule, lay.stages, head)
  busy = sum(balance.stage_costs(costs, lay.stages.layers_per_stage, lay.mesh.pipe, head))
  return lockstep / (busy * lay.microbatches / lay.mesh.pipe)


# ---------------------------------------------------------------------------
# The two profiles.
# ---------------------------------------------------------------------------
def analytic_comm(lay: Layout) -> tuple[CommOp, ...]:
  """Wire bytes by axis from the formulas; launches from the step's structure (XLA's
  all-reduce combiner merges the gradient reductions into about two launches, and
  the pipeline sends one fused permute per tick: both seen in the compiled HLO)."""
  _, wire = analytic_volumes(lay)
  s, cfg, m = lay.mesh, lay.model, lay.microbatches
  ops = []
  for key, w in wire.items():
    axes = tuple(key.split(","))
    if axes == ("tensor",):
      launches = m * (4 * cfg.n_layers / s.pipe + 5 / s.pipe)
      steps = launches * LATENCY_STEPS["all-reduce"](s.tensor)
    elif axes == ("pipe",):
      steps = lay.schedule.ticks + 2 * LATENCY_STEPS["all-reduce"](s.pipe)
    else:
      group = 1
      for a in axes:
        group *= getattr(s, a)
      # fp32/bf16 payloads are all-reduced; quantised and sparse ones go through an
      # all-to-all / all-gather pair (collectives.py), ring-latency each
      if lay.config.compression.method in ("none", "bf16"):
        per_launch = LATENCY_STEPS["all-reduce"](group)
      else:
        per_launch = LATENCY_STEPS["all-to-all"](group) + LATENCY_STEPS["all-gather"](group)
      steps = 2 * per_launch * lay.sync_frequency
    ops.append(CommOp(axes, w, steps))
  return tuple(ops)


def analytic_memory(lay: Layout) -> float:
  """Peak bytes per device: state (in its storage dtypes) + the activations of the
  microbatches in flight (under the remat policies) + the item head's working set."""
  c = lay.config
  local_params = analytic.shard_bytes(lay.param_shapes, lay.param_specs, lay.mesh) / analytic.FP32
  # the hybrid's rows table (split over data) keeps no local-SGD copy of itself
  table_params = (analytic.shard_bytes(lay.param_shapes["items"]["table"],
                                       lay.param_specs["items"]["table"], lay.mesh)
                  / analytic.FP32
                  if lay.table_sharding == "rows" and c.dp.mode in LOCAL_MODES
                  else 0.0)
  param_bytes = jnp.dtype(lay.model.param_dtype).itemsize

  def state_of(params: float, copies_saved: int) -> float:
    return analytic.state_bytes(
        params, param_bytes, jnp.dtype(c.train.opt_state_dtype).itemsize,
        param_bytes < analytic.FP32 and c.train.master_weights,
        analytic.extra_state_copies(
            c.compression.method != "none" and c.compression.error_feedback,
            c.dp.mode) - copies_saved)

  state = state_of(local_params - table_params, 0) + state_of(table_params, 1)
  act_bytes = jnp.dtype(lay.model.compute_dtype).itemsize
  per_layer, transient = analytic.layer_activation_bytes_per_token(
      lay.model, lay.mesh.tensor, act_bytes, lay.model.remat)
  mb_tokens = c.train.batch_size // lay.mesh.data_size // lay.microbatches * c.data.max_len
  table_shards = math.prod(getattr(lay.mesh, a) for a in lay.table_axes)
  # a rows-sharded table scores the tokens of the whole data group against its rows
  head_tokens = mb_tokens * (lay.mesh.data_size if lay.table_sharding == "rows" else 1)
  head = analytic.head_bytes(lay.model, lay.loss, lay.model.table_rows // table_shards,
                             head_tokens, lay.in_batch_tokens)
  if lay.schedule is None:
    in_flight, layers = 1, lay.model.n_layers
  else:
    in_flight = lay.schedule.num_slots
    layers = max(lay.stages.layers_per_stage) * lay.stages.virtual
    if c.pipeline.remat == "full":   # only stage inputs are kept; one stage is rebuilt
      transient += layers * per_layer
      per_layer = act_bytes * lay.model.d_model / layers
  head_share = 1.0 / lay.mesh.pipe if lay.head_spread else 1.0
  return (state + mb_tokens * (in_flight * layers * per_layer + transient)
          + head * head_share)


def executed_flops(lay: Layout) -> float:
  """Per-device FLOPs per step, counting the backward recompute under remat."""
  total = lay.model_flops() + flops.head_recompute_flops(lay.model, lay.tokens, lay.loss,
                                                         lay.in_batch_tokens)
  layer = lay.tokens * lay.model.n_layers * flops.layer_flops_per_token(lay.model)
  if lay.schedule is not None and lay.config.pipeline.remat == "full":
    total += layer
  elif lay.model.remat in ("full", "save_attention_out"):
    total += layer   # one more forward (save_attention_out: all but the attention's)
  return total / lay.mesh.num_devices


def elementwise_bytes(lay: Layout) -> float:
  """Activation-side traffic plus the optimizer's: Adam reads the param, gradient
  and both moments and writes three of them back (7 fp32 passes per local param)."""
  local_tokens = lay.tokens / lay.mesh.data_size
  params = analytic.shard_bytes(lay.param_shapes, lay.param_specs, lay.mesh)
  return 7 * params + analytic.elementwise_bytes(
      lay.model, local_tokens, lay.mesh.tensor, lay.mesh.pipe,
      jnp.dtype(lay.model.compute_dtype).itemsize)


def analytic_profile(lay: Layout) -> StepProfile:
  return StepProfile(
      mesh=lay.mesh, flops=executed_flops(lay),
      model_flops=lay.model_flops(), tokens=lay.tokens,
      comm=analytic_comm(lay), peak_memory_bytes=analytic_memory(lay),
      elementwise_bytes=elementwise_bytes(lay),
      stretch=pipeline_stretch(lay), data_overlap=_overlap(lay.config),
      bf16=lay.model.dtype == "bfloat16", source="analytic")


def hlo_profile(lay: Layout, report: dict[str, Any]) -> StepProfile:
  """From `perf.comm.comm_report` of the compiled step with the same layout."""
  ops = []
  for g in report["collectives"]:
    if not g["axes"]:
      continue
    steps = LATENCY_STEPS[g["kind"]](g["group_size"]) * g["count"] if g["group_size"] > 1 else 0.0
    ops.append(CommOp(tuple(g["axes"]), g["wire_bytes"], steps, g["kind"]))
  return StepProfile(
      mesh=lay.mesh, flops=report["flops"],
      model_flops=lay.model_flops(), tokens=lay.tokens,
      comm=tuple(ops), peak_memory_bytes=report["peak_memory_bytes"],
      elementwise_bytes=elementwise_bytes(lay),
      stretch=pipeline_stretch(lay), data_overlap=_overlap(lay.config),
      bf16=lay.model.dtype == "bfloat16", source="hlo")


def _overlap(config) -> float:
  """`delayed` applies last step's reduced gradient: its exchange overlaps compute."""
  return 1.0 if config.dp.mode == "delayed" else 0.0
