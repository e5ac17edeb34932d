"""The jit-compiled train and eval steps: one jax.jit of one shard_map over the mesh.

Per device, inside the shard_map (docs/design.md, "The train step"):
  1. local gradients of (local CE sum / global token count) w.r.t. params that are
     `pcast` to varying over the data axes, so no implicit gradient all-reduce;
     tensor-parallel collectives come from the layers themselves;
  2. the data-parallel mode sends what crosses the data axes, through the
     configured compressor (parallel/data_parallel.py);
  3. a shard-aware global-norm clip and the optax update of the local shards.
Params are created once from the global definition with `out_shardings`, so every
mesh starts from the same weights. Shapes, specs, the stage split and the
schedules all come from one `Layout` (jaxrec/layout.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec import hardware
from jaxrec.config import ConfigError
from jaxrec.layout import EMBED_TABLE_GRAD_SCOPE, HEAD_TABLE_GRAD_SCOPE, Layout
from jaxrec.mesh import MeshShape, mesh_shape
from jaxrec.models.recommender import RecommenderFns
from jaxrec.parallel import balance, pipeline
from jaxrec.parallel.compression import FINAL_PHASE
from jaxrec.parallel.data_parallel import DataParallel, sum_over_stages
from jaxrec.parallel.vma import make_varying, varying_axes
from jaxrec.partitioning import batch_spec, spec_mesh_axes, tree_shardings
from jaxrec.train.optim import clip_by_global_norm, lr_schedule, optimizer
from jaxrec.train.state import TrainState, opt_state_specs

Batch = dict[str, jax.Array]


def measure_piece_costs(config: ml_collections.ConfigDict, fns: RecommenderFns,
                        mesh: Mesh) -> balance.PieceCosts:
  """The piece costs pipeline stages are balanced on, per `pipeline.balance_costs`:
  "device" (default) uses the running device's published profile when there is one
  (H100, TPU v5p) and times the pieces otherwise; "timed" always times them; a
  profile name ("h100", "tpu_v5p", "local" = fitted) uses that roofline."""
  choice = config.pipeline.balance_costs
  profile = None
  if choice == "device":
    profile = hardware.for_device(mesh.devices.flat[0].device_kind)
  elif choice != "timed":
    profile = hardware.get(choice)
  costs = balance.measure(fns, mesh, config, profile, timed=profile is None)
  logging.info("pipeline stage costs: %s (pipeline.balance_costs=%r)", costs.source, choice)
  return costs


def _needs_balancing(config: ml_collections.ConfigDict, mesh: Mesh) -> bool:
  return (mesh.shape["pipe"] > 1 and
          pipeline.parse_layers_per_stage(config.pipeline.layers_per_stage) == "auto")


class TrainProgram:
  """The state layout and the compiled steps for one (config, model, mesh)."""

  def __init__(self, config: ml_collections.ConfigDict, fns: RecommenderFns, mesh: Mesh,
               costs: balance.PieceCosts | None = None):
    self.config = config
    self.fns = fns
    self.mesh = mesh
    platform = mesh.devices.flat[0].platform if isinstance(mesh, Mesh) else None
    if fns.cfg.attention == "cudnn" and platform not in ("gpu", None):
      raise ConfigError(
          f"config.model.attention = 'cudnn' needs GPU devices; this mesh has {platform} "
          "devices: use 'xla'")
    if costs is None and _needs_balancing(config, mesh):
      costs = measure_piece_costs(config, fns, mesh)
    self.layout = Layout.build(config, fns, mesh_shape(mesh), costs)
    self.tx = optimizer(config.train, fns.logical_axes, fns.cfg.param_dtype,
                        config.embedding.optimizer)
    self.lr_schedule = lr_schedule(config.train)
    self.inject_nonfinite = tuple(
        int(x) for x in str(config.train.inject_nonfinite_steps).split(",") if x.strip())
    lay = self.layout
    opt_specs = opt_state_specs(jax.eval_shape(self.tx.init, lay.param_shapes),
                                lay.param_shapes,
                                lay.param_specs)
    self.dp = DataParallel(config.dp, lay.grad_sync, lay.mesh, lay.param_specs,
                           lay.param_shapes, self.tx, opt_specs)
    self.state_specs = TrainState(
        step=P(), params=lay.param_specs,
        opt_state={} if self.dp.local else opt_specs,
        dp_state=self.dp.state_specs(opt_specs),
        comp_state=lay.grad_sync.state_specs(), rng=P())
    self.state_shardings = tree_shardings(mesh, self.state_specs)
    self._train_steps: dict[int, Any] = {}
    self.eval_ranks = jax.jit(self._eval_ranks)

  @property
  def shape(self) -> MeshShape:
    return self.layout.mesh

  # ------------------------------------------------------------------ state
  def init_state(self, seed: int) -> TrainState:
    """Identical params on every mesh: created from the global definition, then sharded."""
    def init(key):
      params = self.fns.init(jax.random.fold_in(key, 0))
      params["layers"] = self.layout.stages.to_slots(params["layers"])
      return self.init_state_from(params, jax.random.key_data(key), jnp.int32(0))
    return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(seed))

  def init_state_from(self, params: Any, rng: jax.Array, step: jax.Array) -> TrainState:
    """A fresh optimizer/compressor/mode state around given params (traceable)."""
    opt_state = self.tx.init(params)
    return TrainState(
        step=step, params=params, opt_state={} if self.dp.local else opt_state,
        dp_state=self.dp.init_state(params, opt_state),
        comp_state=self.layout.grad_sync.init_state(
            jax.random.fold_in(jax.random.wrap_key_data(rng), 1)),
        rng=rng)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings: the target of a restore."""
    shapes = jax.eval_shape(self.init_state, 0)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def learning_rate(self, step: int) -> float:
    return float(self.lr_schedule(step))

  # ------------------------------------------------------------------- train
  def phase(self, step: int | None) -> int:
    """The compressor's warm-up phase at `step` (static: each phase compiles once)."""
    compressor = self.layout.grad_sync.compressor
    if step is None or not hasattr(compressor, "phase"):
      return FINAL_PHASE
    return compressor.phase(step)

  def jitted_train_step(self, phase: int = FINAL_PHASE):
    if phase not in self._train_steps:
      self._train_steps[phase] = jax.jit(functools.partial(self._train_step, phase=phase),
                                         donate_argnums=0)
    return self._train_steps[phase]

  def train_step(self, state: TrainState, batch: Batch, step: int | None = None):
    """One optimizer step; `step` (host int) selects the compression warm-up phase."""
    return self.jitted_train_step(self.phase(step))(state, batch)

  def _train_step(self, state: TrainState, batch: Batch, phase: int):
    return jax.shard_map(functools.partial(self._local_train_step, phase=phase),
                         mesh=self.mesh, in_specs=(self.state_specs, self._batch_specs(batch)),
                         out_specs=(self.state_specs, P()))(state, batch)

  def _batch_specs(self, batch: Batch) -> dict[str, P]:
    return {k: batch_spec(v.ndim, self.shape) for k, v in batch.items()}

  def _local_train_step(self, state: TrainState, batch: Batch, phase: int):
    loss, grads, tokens = self._local_loss_and_grads(state, batch)
    if self.inject_nonfinite:  # fault injection for tests and drills
      poison = jnp.isin(state.step, jnp.asarray(self.inject_nonfinite))
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
      loss = jnp.where(poison, jnp.nan, loss)
    params, opt_state, dp_state, comp_state, grad_norm = self.dp.apply(
        grads, state.params, state.opt_state, state.dp_state, state.comp_state, state.step,
        self._optimize, self._device_key(state), phase)
    grad_norm = self._data_mean(grad_norm)
    # A step whose loss or gradient is not finite changes nothing but the step count:
    # params, optimizer, compressor and async state keep their previous values.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), dp_state=keep(dp_state, state.dp_state),
        comp_state=keep(comp_state, state.comp_state))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                       "skipped": (~finite).astype(jnp.int32)}

  def _optimize(self, grads, opt_state, params, synced=None):
    grads, norm = clip_by_global_norm(grads, self.layout.param_specs,
                                      self.config.train.grad_clip, synced)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm

  def _local_loss_and_grads(self, state: TrainState, batch: Batch):
    """Mean token loss of the global batch and this device's unreduced gradient."""
    lay = self.layout
    inputs, targets = token_arrays(batch), batch["targets"]
    n_targets = psum((targets > 0).sum().astype(jnp.float32), lay.data_axes)
    inputs["rows"] = self._first_row(targets.shape[0]) + jnp.arange(targets.shape[0])
    row_keys = self._row_keys(state, targets.shape[0])
    # Gradients are taken w.r.t. fp32 copies of the params (the model casts them to
    # its storage and compute dtypes), so they accumulate and travel in fp32.
    params = _floats_as(self.dp.working_params(state.params, state.dp_state), jnp.float32)
    params = make_varying(params, lay.grad_axes)
    negatives = loss_key(state.rng, state.step)
    if lay.pipe_axis:
      loss, grads = self._pipeline_grads(params, inputs, targets, row_keys, n_targets, negatives)
    else:
      loss, grads = self._local_grads(params, inputs, targets, row_keys, n_targets, negatives)
    loss = psum(loss, lay.grad_axes)
    if lay.pipe_axis:
      grads = sum_over_stages(grads, lay.param_specs, lay.pipe_axis)
    return loss, grads, n_targets

  def loss_and_grads(self, state: TrainState, batch: Batch):
    """(loss, gradients summed over the data axes, uncompressed): what tests compare."""
    def local(s, b):
      loss, grads, _ = self._local_loss_and_grads(s, b)
      return loss, jax.tree.map(
          lambda g, spec: psum(g, tuple(a for a in self.layout.data_axes
                                        if a not in spec_mesh_axes(spec))),
          grads, self.layout.param_specs)

    fn = jax.shard_map(local, mesh=self.mesh, in_specs=(self.state_specs, self._batch_specs(batch)),
                       out_specs=(P(), self.layout.param_specs))
    return jax.jit(fn)(state, batch)

  def _device_key(self, state: TrainState) -> jax.Array:
    """A PRNG key per (step, data replica), e.g. for stochastic rounding."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key = jax.random.fold_in(key, 0x5EED)
    axes = self.layout.data_axes
    return jax.random.fold_in(key, lax.axis_index(axes)) if axes else key

  def _data_mean(self, x: jax.Array) -> jax.Array:
    axes = tuple(a for a in self.layout.data_axes if a in varying_axes(x))
    return lax.pmean(x, axes) if axes else x

  def _first_row(self, local_batch: int) -> jax.Array:
    """The global index of this device's first batch row."""
    axes = self.layout.data_axes
    return (lax.axis_index(axes) if axes else jnp.int32(0)) * local_batch

  def _row_keys(self, state: TrainState, local_batch: int) -> jax.Array | None:
    """One dropout key per global example row, independent of the mesh."""
    if self.fns.cfg.dropout <= 0:
      return None
    return row_keys(state.rng, state.step,
                    self._first_row(local_batch) + jnp.arange(local_batch))

  def context(self, keys=None, axis="tensor", negatives=None):
    """The model's per-call context: `keys` are per-row dropout keys (typed or raw),
    `negatives` the step's key for sampled negatives; axis "head" reduces over the
    item head's axes (tensor, plus pipe for the spread head)."""
    if keys is not None and not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.wrap_key_data(keys)
    lay = self.layout
    return self.fns.context(tensor_axis=lay.tensor_axis, row_keys=keys,
                            dropout_rate=None if keys is not None else 0.0,
                            loss_key=negatives, batch_axes=lay.data_axes,
                            table_axes=lay.table_axes if axis == "tensor" else lay.head_axes,
                            row_gradients=self.config.embedding.row_gradients)

  def _local_grads(self, params, inputs, targets, row_keys, n_targets, negatives):
    """Sum over microbatches of d(loss sum / tokens)/d params, on this device's rows."""
    storage = self.fns.cfg.storage_dtype

    def loss_fn(p, inp, tgt, keys):
      total, _ = self.fns.loss(_floats_as(p, storage), inp, tgt,
                               self.context(keys, negatives=negatives))
      return total / n_targets

    grad_fn = jax.value_and_grad(loss_fn)
    m = self.layout.microbatches
    if m == 1:
      return grad_fn(params, inputs, targets, row_keys)

    def split(x):
      return jax.tree.map(lambda a: a.reshape(m, a.shape[0] // m, *a.shape[1:]), x)

    def body(acc, mb):
      loss, grads = grad_fn(params, *mb)
      return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0.0), params))
    zeros = make_varying(zeros, self.layout.grad_axes)
    (loss, grads), _ = lax.scan(body, zeros, (split(inputs), split(targets), split(row_keys)))
    return loss, grads

  # --------------------------------------------------------------- pipeline
  def _head_view(self, shared):
    """The params the item head reads: with the spread head, this stage's slice of its
    tensor shard of the item table (it scores that share of the catalogue)."""
    if not self.layout.head_spread:
      return shared
    table = shared["items"]["table"]
    rows = table.shape[0] // self.shape.pipe
    piece = lax.dynamic_slice_in_dim(table, lax.axis_index("pipe") * rows, rows, 0)
    return {**shared, "items": {**shared["items"], "table": piece}}

  def _pieces(self, head) -> pipeline.StagePieces:
    fns = self.fns

    def embed_vjp(shared, tokens, keys, d_x):
      rows = fns.lookup(shared, tokens["inputs"], self.context())
      small = _small(shared)
      _, vjp = jax.vjp(lambda s, r: fns.embed_rows({**shared, **s}, r, tokens, self.context(keys)),
                       small, rows)
      return vjp(d_x)

    def stage(params, x, aux):
      tokens, layer_ids, active, keys = aux
      return fns.layers(params, x, tokens, self.context(keys), layer_ids, active)

    if self.config.pipeline.remat == "full":
      stage = jax.checkpoint(stage, policy=jax.checkpoint_policies.nothing_saveable)
    return pipeline.StagePieces(
        embed=lambda shared, tokens, keys: fns.embed(shared, tokens, self.context(keys)),
        embed_vjp=embed_vjp, stage=stage, head=head, small=_small)

  def _pipeline_grads(self, params, inputs, targets, row_keys, n_targets, negatives):
    lay = self.layout
    m = lay.microbatches
    fns = self.fns
    head_ctx = self.context(axis="head", negatives=negatives)
    mb_targets = pipeline.microbatch(targets, m)
    mb_tokens = {k: pipeline.microbatch(v, m) for k, v in inputs.items()}

    def head(shared, y, i):
      view = self._head_view(shared)
      return fns.head_forward(view, y, mb_targets[i], head_ctx, 1.0 / n_targets,
                              {k: v[i] for k, v in mb_tokens.items()})

    # Stage params enter the executor in the compute dtype, cast once per step: a
    # cast inside the stage would be a VJP residual stored per microbatch slot.
    stage_params = _floats_as(params["layers"], self.fns.cfg.compute_dtype)
    shared = _floats_as({k: v for k, v in params.items() if k != "layers"},
                        self.fns.cfg.storage_dtype)
    keys = None if row_keys is None else pipeline.microbatch(jax.random.key_data(row_keys), m)
    result = pipeline.run(
        lay.schedule, lay.stages, self._pieces(head), stage_params, shared,
        mb_tokens, keys, vary_axes=lay.data_axes,
        head_spread=lay.head_spread)
    # The item table's gradient, once per step: the looked-up rows' (stage 0: the
    # lookup's transpose, a scatter-add — with rows sharding the sparse exchange over
    # data) plus the head's (the last stage's, or every stage's slice).
    table = shared["items"]["table"]
    ids = inputs["inputs"]
    d_rows = result.d_rows.reshape(ids.shape + result.d_rows.shape[-1:])
    vary = varying_axes(table) | set(lay.grad_axes)

    def embed_grads():
      _, vjp = jax.vjp(lambda t: fns.lookup({"items": {"table": t}}, ids, self.context()), table)
      (g,) = vjp(make_varying(d_rows.astype(fns.cfg.compute_dtype), lay.grad_axes))
      return make_varying(g.astype(jnp.float32), vary)

    with jax.named_scope(EMBED_TABLE_GRAD_SCOPE):
      g_table = lax.cond(lax.axis_index("pipe") == 0, embed_grads,
                         lambda: make_varying(jnp.zeros(table.shape, jnp.float32), vary))
    view = self._head_view(shared)

    def head_grads():
      return make_varying(fns.head_table_grad(view, result.saved, head_ctx, 1.0 / n_targets),
                          vary)

    if lay.head_spread:
      piece = head_grads()
      start = lax.axis_index("pipe") * piece.shape[0]
      g_table = lax.dynamic_update_slice_in_dim(
          g_table, lax.dynamic_slice_in_dim(g_table, start, piece.shape[0], 0) + piece, start, 0)
    else:   # only the last stage scored microbatches
      last = lax.axis_index("pipe") == lay.mesh.pipe - 1
      with jax.named_scope(HEAD_TABLE_GRAD_SCOPE):
        g_table = g_table + lax.cond(last, head_grads,
                                     lambda: make_varying(jnp.zeros_like(g_table), vary))
    grads = {**result.small_grads, "items": {**shared["items"], "table": g_table},
             "layers": result.stage_grads}
    grads = jax.tree.map(lambda g, p: make_varying(g.astype(jnp.float32), varying_axes(p)),
                         grads, params)
    return result.loss, grads

  # -------------------------------------------------------------------- eval
  def _eval_ranks(self, params: Any, batch: Batch) -> jax.Array:
    return jax.shard_map(self._local_eval, mesh=self.mesh,
                         in_specs=(self.layout.param_specs, self._batch_specs(batch)),
                         out_specs=batch_spec(1, self.shape))(params, batch)

  def _local_eval(self, params, batch: Batch) -> jax.Array:
    lay = self.layout
    ctx = self.context()
    if not lay.pipe_axis:
      h = self.fns.last_hidden(params, token_arrays(batch), ctx)
      return self.fns.rank(params, h, batch["target"], batch["exclude"], ctx)

    head_ctx = self.context(axis="head")
    m = lay.eval_schedule.microbatches
    mbs = {k: pipeline.microbatch(v, m) for k, v in batch.items()}

    def head(shared, y, i):
      view = self._head_view(shared)
      h = self.fns.final_hidden(view, y[:, -1])
      return self.fns.rank(view, h, mbs["target"][i], mbs["exclude"][i], head_ctx)

    shared = {k: v for k, v in params.items() if k != "layers"}
    result = pipeline.run(lay.eval_schedule, lay.stages, self._pieces(head), params["layers"],
                          shared, token_arrays(mbs), None,
                          vary_axes=lay.data_axes, head_spread=lay.head_spread)
    return lax.psum(result.outputs, "pipe").reshape(-1)   # one stage wrote the ranks

  # ----------------------------------------------------------------- helpers
  def branch_weights(self) -> dict[str, list[float]]:
    """How often each conditional branch of the train step runs on an average device."""
    return {**self.dp.branch_weights(), **self.layout.branch_weights()}

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, batch_spec(ndim, self.shape))


TOKEN_FIELDS = ("inputs", "segments", "timestamps", "target_times")


def token_arrays(batch: Batch) -> dict[str, jax.Array]:
  """The batch's per-token model inputs: item ids, segment ids for packed rows, and
  timestamps where the model reads them."""
  return {k: batch[k] for k in TOKEN_FIELDS if k in batch}


def _floats_as(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def _small(shared: dict) -> dict:
  """The shared params other than the item table (positions, final norm)."""
  return {k: v for k, v in shared.items() if k != "items"}


def psum(x: Any, axes: tuple[str, ...]) -> Any:
  """psum over the given (active) axes; nothing to do when there are none."""
  return lax.psum(x, axes) if axes else x


def loss_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The step's key for sampled negatives: one per step, the same on every device and
  mesh (so data:8 samples what data:1 samples)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), 0x4E45)


def row_keys(rng: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
  """Dropout keys for global batch rows `rows` at `step` (raw uint32 base key)."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows)
