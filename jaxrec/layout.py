"""One Layout of a run: what a (config, model, mesh shape) fixes before any array exists.

The train step builds its program from it; the planner and the cost model read the
same object for meshes too large to build. It holds the stage split (balanced or
given), where the item head runs, the pipeline schedules, parameter shapes in the
pipeline's slot layout, their PartitionSpecs and the gradient synchronisation — no
jax arrays and no devices, so a 1024-device plan is as cheap as an 8-device one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxrec.config import LOCAL_MODES
from jaxrec.mesh import DATA_AXES, MeshShape, active_axes
from jaxrec.models import flops, losses
from jaxrec.models.recommender import LAYER_SLOT_SCOPE, ModelConfig, RecommenderFns
from jaxrec.parallel import balance, device_local
from jaxrec.parallel.compression import make_compressor
from jaxrec.parallel.data_parallel import GradientSync
from jaxrec.parallel.pipeline import Schedule, StageLayout, parse_layers_per_stage
from jaxrec.partitioning import check_divisible, rules_for, tree_specs

# Name scope of the pipeline's post-loop conditional that forms the item table's
# gradient from the head's saved values on the last stage only.
HEAD_TABLE_GRAD_SCOPE = "pipeline_head_table_grad"
# ... and the one that forms the lookup's part of it on the first stage only.
EMBED_TABLE_GRAD_SCOPE = "pipeline_embed_table_grad"


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Everything about a (config, model, mesh shape) that fixes shapes, FLOPs and bytes."""
  config: ml_collections.ConfigDict
  model: ModelConfig
  loss: losses.LossConfig
  mesh: MeshShape
  stages: StageLayout
  head_spread: bool
  schedule: Schedule | None          # the training schedule (None without a pipe axis)
  eval_schedule: Schedule | None     # forward-only, pipe microbatches
  param_shapes: Any                  # global shapes; stacked layers in the slot layout
  param_specs: Any
  grad_sync: GradientSync
  balance_plan: balance.Plan | None = None
  costs_source: str = ""             # which piece costs chose an "auto" stage split

  # ---------------------------------------------------------------- axes
  @property
  def data_axes(self) -> tuple[str, ...]:
    """Data axes of size > 1: the only ones worth a collective."""
    return active_axes(self.mesh, DATA_AXES)

  @property
  def pipe_axis(self) -> str | None:
    return "pipe" if self.mesh.pipe > 1 else None

  @property
  def tensor_axis(self) -> str | None:
    return "tensor" if self.mesh.tensor > 1 else None

  @property
  def grad_axes(self) -> tuple[str, ...]:
    """Axes gradients are taken per device over and reduced explicitly."""
    return self.data_axes + ((self.pipe_axis,) if self.pipe_axis else ())

  @property
  def table_sharding(self) -> str:
    return self.config.embedding.sharding

  @property
  def table_axes(self) -> tuple[str, ...]:
    """The mesh axes the item table's rows are split over (size > 1 only)."""
    spec = self.param_specs["items"]["table"][0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return axes

  @property
  def table_data_axes(self) -> tuple[str, ...]:
    """The data axes among the table's (rows sharding): its lookups and head cross them."""
    return tuple(a for a in self.table_axes if a in self.data_axes)

  @property
  def head_axes(self) -> tuple[str, ...]:
    """The axes the item head reduces over: the table's, plus pipe for the spread head."""
    return self.table_axes + (("pipe",) if self.head_spread else ())

  # ------------------------------------------------------------ amounts
  @property
  def microbatches(self) -> int:
    return self.config.pipeline.microbatches

  @property
  def local_batch(self) -> int:
    return self.config.train.batch_size // self.mesh.data_size

  @property
  def tokens(self) -> int:
    return self.config.train.batch_size * self.config.data.max_len

  @property
  def in_batch_tokens(self) -> int:
    """Target slots one token's in-batch negatives come from: its (micro)batch's,
    gathered over the data axes when `loss.in_batch_global`."""
    per_device = self.local_batch // self.microbatches * self.config.data.max_len
    return per_device * (self.mesh.data_size if self.loss.in_batch_global else 1)

  def model_flops(self) -> float:
    """Useful FLOPs of one step over all devices."""
    return flops.model_flops(self.model, self.tokens, self.loss, self.in_batch_tokens)

  @property
  def sync_frequency(self) -> float:
    """Data-axis exchanges per step: 1/H for local SGD / DiLoCo."""
    dp = self.config.dp
    return 1.0 / dp.sync_every if dp.mode in LOCAL_MODES else 1.0

  # -------------------------------------------------------------- build
  @classmethod
  def build(cls, config: ml_collections.ConfigDict, fns: RecommenderFns, mesh: MeshShape,
            costs: balance.PieceCosts | None = None) -> "Layout":
    """The layout of `config` on a mesh of this shape.

    `pipeline.layers_per_stage = "auto"` is solved by the balancer on `costs`
    (measured by the train step on its devices); without them, on the model's
    analytic FLOPs (what the planner uses for meshes it cannot build).
    """
    model, pcfg = fns.cfg, config.pipeline
    specs = tree_specs(fns.logical_axes, mesh,
                       rules_for(config.embedding.sharding, config.embedding.shard_replica))
    pipelined = mesh.pipe > 1
    virtual = pcfg.virtual_stages if pipelined else 1
    counts = parse_layers_per_stage(pcfg.layers_per_stage) if pipelined else "uniform"
    head_spread = pipelined and pcfg.head == "spread"
    plan, source = None, ""
    if counts == "auto":
      if costs is None:
        costs = analytic_piece_costs(model, fns.loss_cfg, mesh,
                                     config.train.batch_size // mesh.data_size
                                     // pcfg.microbatches)
      heads = ("last", "spread") if pcfg.head == "auto" else (pcfg.head,)
      plan = balance.plan(costs, model.n_layers, mesh.pipe, virtual, pcfg.schedule,
                          pcfg.microbatches, heads)
      counts, source = plan.layers_per_stage, costs.source
      head_spread = plan.head == "spread"
    stages = StageLayout.build(model.n_layers, mesh.pipe, virtual, counts)
    shapes = {**fns.shapes, "layers": stages.slot_shapes(fns.shapes["layers"])}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
      check_divisible(leaf.shape, _at(specs, path), mesh,
                      f"parameter {jax.tree_util.keystr(path)} {leaf.shape}")
    schedule = eval_schedule = None
    if pipelined:
      schedule = Schedule(pcfg.schedule, mesh.pipe, pcfg.microbatches, virtual)
      eval_schedule = Schedule(pcfg.schedule, mesh.pipe, mesh.pipe, virtual, forward_only=True)
    local = device_local.local_shapes(shapes, specs, mesh)
    sync = GradientSync(make_compressor(config.compression), mesh, local, specs,
                        hierarchical=config.compression.hierarchical,
                        min_size=config.compression.min_size)
    return cls(config, model, fns.loss_cfg, mesh, stages, head_spread, schedule, eval_schedule,
               shapes, specs, sync, plan, source)

  def branch_weights(self, live_chunks: float = 1.0) -> dict[str, list[float]]:
    """How often each named conditional's branches run per step on an average device
    (the pipeline's and the item loss's; the data-parallel mode adds its own).
    `live_chunks`: the share of the item loss's token chunks that hold real targets
    (1 = count every chunk, an upper bound; with packing it is about 1)."""
    weights = {losses.CHUNK_SCOPE: [1.0 - live_chunks, live_chunks]}
    if self.schedule is not None:
      weights.update(self.schedule.branch_weights())
      weights[EMBED_TABLE_GRAD_SCOPE] = [1.0 - 1.0 / self.mesh.pipe, 1.0 / self.mesh.pipe]
      if not self.head_spread:
        weights[HEAD_TABLE_GRAD_SCOPE] = [1.0 - 1.0 / self.mesh.pipe, 1.0 / self.mesh.pipe]
    if self.stages.padded:
      weights[LAYER_SLOT_SCOPE] = [1.0 - self.stages.active_fraction(),
                                   self.stages.active_fraction()]
    return weights


def analytic_piece_costs(model: ModelConfig, loss: losses.LossConfig, mesh: MeshShape,
                         microbatch: int) -> balance.PieceCosts:
  """Per-microbatch piece costs in FLOPs per device (the balancer only needs ratios).
  The head's forward and backward run its logits four times (tiled softmax:
  forward with the input gradient, then the recomputed logits for the table's)."""
  tokens = microbatch * model.max_len
  t = mesh.tensor
  layer = flops.layer_flops_per_token(model) * tokens / t
  head = 4 * flops.head_flops_per_token(model.d_model, model.table_rows, loss,
                                        tokens * mesh.data_size) * tokens / t
  # The lookup does no matmul; charge it a memory-bound token's worth so stage 0 is
  # not treated as free (it is tiny next to a layer).
  embed = 2.0 * model.d_model * tokens / t
  return balance.PieceCosts(layer, 2 * layer, embed, embed, head, source="analytic FLOPs")


def _at(tree: Any, path) -> Any:
  for key in path:
    tree = tree[key.key]
  return tree

