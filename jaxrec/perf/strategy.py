"""A parallel strategy as the cost model sees it: FLOPs, bytes per axis, memory.

Two sources for the same `cost_model.StepProfile`:
- `hlo_profile`: compile the real train step (abstract inputs, no arrays) on a mesh
  of (fake) devices and read FLOPs, collectives and peak memory from the HLO;
- `analytic_profile`: the textbook formulas of `perf/analytic.py` for a mesh shape
  alone — no devices needed, so pods of any size can be planned. Tests check the
  two agree (bytes within 5%) on every strategy the CPU can compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxrec.mesh import MeshShape
from jaxrec.models.recommender import ModelConfig, RecommenderFns
from jaxrec.parallel import balance, device_local, pipeline
from jaxrec.parallel.compression import make_compressor
from jaxrec.parallel.data_parallel import GradientSync
from jaxrec.partitioning import check_divisible, tree_specs
from jaxrec.perf import analytic
from jaxrec.perf.cost_model import LATENCY_STEPS, CommOp, StepProfile

LOCAL_MODES = ("local_sgd", "diloco")


@dataclasses.dataclass
class Layout:
  """Everything about a (config, mesh shape) that fixes FLOPs and bytes."""
  config: ml_collections.ConfigDict
  cfg: ModelConfig
  shape: MeshShape
  layout: pipeline.StageLayout
  head_spread: bool
  schedule: pipeline.Schedule | None
  grad_sync: GradientSync
  param_shapes: Any
  param_specs: Any

  @property
  def microbatches(self) -> int:
    return self.config.pipeline.microbatches if self.shape.pipe > 1 else 1

  @property
  def sync_frequency(self) -> float:
    dp = self.config.dp
    return 1.0 / dp.sync_every if dp.mode in LOCAL_MODES else 1.0

  @property
  def tokens(self) -> int:
    return self.config.train.batch_size * self.config.data.max_len


def layout_for(config: ml_collections.ConfigDict, num_items: int, shape: MeshShape,
               fns: RecommenderFns | None = None) -> Layout:
  """The strategy's layout from the mesh shape alone (no devices, no arrays).

  `layers_per_stage = "auto"` is solved by the balancer on analytic piece costs
  (TrainProgram measures the compiled pieces instead)."""
  fns = fns or RecommenderFns(ModelConfig.from_config(config.model, num_items,
                                                      config.data.max_len))
  cfg = fns.cfg
  pcfg = config.pipeline
  specs = tree_specs(fns.logical_axes, shape)
  head_spread = shape.pipe > 1 and pcfg.head == "spread"
  schedule = None
  counts: Any = "uniform"
  virtual = pcfg.virtual_stages if shape.pipe > 1 else 1
  if shape.pipe > 1:
    schedule = pipeline.Schedule(pcfg.schedule, shape.pipe, pcfg.microbatches, virtual)
    counts = pipeline.parse_layers_per_stage(pcfg.layers_per_stage)
    if counts == "auto":
      costs = piece_costs(cfg, shape, config.train.batch_size // shape.data_size
                          // pcfg.microbatches)
      heads = ("last", "spread") if pcfg.head == "auto" else (pcfg.head,)
      plan = balance.plan(costs, cfg.n_layers, shape.pipe, virtual, pcfg.schedule,
                          pcfg.microbatches, heads)
      counts, head_spread = plan.layers_per_stage, plan.head == "spread"
  layout = pipeline.StageLayout.build(cfg.n_layers, shape.pipe, virtual, counts)
  shapes = {**fns.shapes, "layers": layout.slot_shapes(fns.shapes["layers"])}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    spec = _at(specs, path)
    check_divisible(leaf.shape, spec, shape, f"parameter {jax.tree_util.keystr(path)}")
  local = device_local.local_shapes(shapes, specs, shape)
  sync = GradientSync(make_compressor(config.compression), shape, local, specs,
                      hierarchical=config.compression.hierarchical,
                      min_size=config.compression.min_size)
  return Layout(config, cfg, shape, layout, head_spread, schedule, sync, shapes, specs)


def _at(tree: Any, path) -> Any:
  for key in path:
    tree = tree[key.key]
  return tree


def analytic_volumes(lay: Layout) -> tuple[dict[str, float], dict[str, float]]:
  """(payload, ring-wire) bytes per device per step by axis key."""
  c = lay.config
  step = analytic.StepShape(
      mesh=lay.shape, global_batch=c.train.batch_size, seq_len=c.data.max_len,
      d_model=lay.cfg.d_model, n_layers=lay.cfg.n_layers,
      act_bytes=jnp.dtype(lay.cfg.compute_dtype).itemsize,
      virtual_stages=lay.layout.virtual, head_spread=lay.head_spread)
  shared = {k: v for k, v in lay.param_shapes.items() if k != "layers"}
  shared_specs = {k: v for k, v in lay.param_specs.items() if k != "layers"}
  return analytic.analytic_bytes_by_axis(
      step, lay.grad_sync.analytic_bytes(), lay.sync_frequency,
      analytic.shard_bytes(shared, shared_specs, lay.shape))


# ---------------------------------------------------------------------------
# Pipeline lockstep: how much longer than the average busy time a step takes.
# ---------------------------------------------------------------------------
def piece_costs(cfg: ModelConfig, shape: MeshShape, microbatch: int) -> balance.PieceCosts:
  """Per-microbatch piece costs in FLOPs per device (the balancer only needs ratios)."""
  tokens = microbatch * cfg.max_len
  t = shape.tensor
  layer = analytic.layer_flops_per_token(cfg.d_model, cfg.d_ff, cfg.max_len, cfg.mlp) * tokens / t
  head = 3 * analytic.head_flops_per_token(cfg.d_model, cfg.table_rows) * tokens / t
  # The lookup does no matmul; charge it a memory-bound token's worth so stage 0 is
  # not treated as free (it is tiny next to a layer).
  embed = 2.0 * cfg.d_model * tokens / t
  return balance.PieceCosts(layer, 2 * layer, embed, embed, head, source="analytic FLOPs")


def pipeline_stretch(lay: Layout) -> float:
  """Lockstep step time / average busy time per device (1 without a pipeline): the
  bubble and the stage imbalance in one factor, read off the schedule's table."""
  if lay.schedule is None:
    return 1.0
  costs = piece_costs(lay.cfg, lay.shape, lay.config.train.batch_size // lay.shape.data_size
                      // lay.microbatches)
  head = "spread" if lay.head_spread else "last"
  lockstep = balance.predicted_step_time(costs, lay.schedule, lay.layout, head)
  busy = sum(balance.stage_costs(costs, lay.layout.layers_per_stage, lay.shape.pipe, head))
  return lockstep / (busy * lay.microbatches / lay.shape.pipe)


# ---------------------------------------------------------------------------
# The two profiles.
# ---------------------------------------------------------------------------
def analytic_comm(lay: Layout) -> tuple[CommOp, ...]:
  """Wire bytes by axis from the formulas; launches from the step's structure (XLA's
  all-reduce combiner merges the gradient reductions into about two launches, and
  the pipeline sends one fused permute per tick: both seen in the compiled HLO)."""
  _, wire = analytic_volumes(lay)
  s, cfg, m = lay.shape, lay.cfg, lay.microbatches
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
  """Peak bytes per device: state + the activations of the microbatches in flight."""
  c = lay.config
  param_bytes = analytic.shard_bytes(lay.param_shapes, lay.param_specs, lay.shape)
  state = param_bytes / analytic.FP32 * analytic.state_bytes_per_param(
      c.compression.method != "none" and c.compression.error_feedback, c.dp.mode)
  act_bytes = jnp.dtype(lay.cfg.compute_dtype).itemsize
  per_layer, head = analytic.activation_bytes_per_token(lay.cfg, lay.shape.tensor, act_bytes)
  mb_tokens = c.train.batch_size // lay.shape.data_size // lay.microbatches * c.data.max_len
  if lay.schedule is None:
    in_flight, layers = 1, lay.cfg.n_layers
  else:
    in_flight = lay.schedule.num_slots
    layers = max(lay.layout.layers_per_stage) * lay.layout.virtual
    if c.pipeline.remat:
      per_layer = act_bytes * lay.cfg.d_model / layers   # only stage inputs are kept
  head_share = 1.0 / lay.shape.pipe if lay.head_spread else 1.0
  return state + mb_tokens * (in_flight * layers * per_layer + head * head_share)


def executed_flops(lay: Layout) -> float:
  """Per-device FLOPs per step, counting the backward recompute under remat."""
  total = analytic.model_flops(lay.cfg, lay.tokens)
  if lay.schedule is not None and lay.config.pipeline.remat:
    total += lay.tokens * lay.cfg.n_layers * analytic.layer_flops_per_token(
        lay.cfg.d_model, lay.cfg.d_ff, lay.cfg.max_len, lay.cfg.mlp)
  return total / lay.shape.num_devices


def elementwise_bytes(lay: Layout) -> float:
  """Activation-side traffic plus the optimizer's: Adam reads the param, gradient
  and both moments and writes three of them back (7 fp32 passes per local param)."""
  local_tokens = lay.tokens / lay.shape.data_size
  params = analytic.shard_bytes(lay.param_shapes, lay.param_specs, lay.shape)
  return 7 * params + analytic.elementwise_bytes(
      lay.cfg, local_tokens, lay.shape.tensor, lay.shape.pipe,
      jnp.dtype(lay.cfg.compute_dtype).itemsize)


def analytic_profile(lay: Layout) -> StepProfile:
  return StepProfile(
      mesh=lay.shape, flops=executed_flops(lay),
      model_flops=analytic.model_flops(lay.cfg, lay.tokens), tokens=lay.tokens,
      comm=analytic_comm(lay), peak_memory_bytes=analytic_memory(lay),
      elementwise_bytes=elementwise_bytes(lay),
      stretch=pipeline_stretch(lay), data_overlap=_overlap(lay.config),
      bf16=lay.cfg.dtype == "bfloat16", source="analytic")


def hlo_profile(lay: Layout, report: dict[str, Any]) -> StepProfile:
  """From `perf.comm.comm_report` of the compiled step with the same layout."""
  ops = []
  for g in report["collectives"]:
    if not g["axes"]:
      continue
    steps = LATENCY_STEPS[g["kind"]](g["group_size"]) * g["count"] if g["group_size"] > 1 else 0.0
    ops.append(CommOp(tuple(g["axes"]), g["wire_bytes"], steps, g["kind"]))
  return StepProfile(
      mesh=lay.shape, flops=report["flops"],
      model_flops=analytic.model_flops(lay.cfg, lay.tokens), tokens=lay.tokens,
      comm=tuple(ops), peak_memory_bytes=report["peak_memory_bytes"],
      elementwise_bytes=elementwise_bytes(lay),
      stretch=pipeline_stretch(lay), data_overlap=_overlap(lay.config),
      bf16=lay.cfg.dtype == "bfloat16", source="hlo")


def _overlap(config) -> float:
  """`delayed` applies last step's reduced gradient: its exchange overlaps compute."""
  return 1.0 if config.dp.mode == "delayed" else 0.0


def layout_of(program) -> Layout:
  """The Layout of a built TrainProgram (its balancer may have measured the pieces)."""
  return Layout(program.config, program.fns.cfg, program.shape, program.layout,
                program.head_spread, program.schedule if program.pipe_axis else None,
                program.grad_sync, program.param_shapes, program.param_specs)
