"""The jit-compiled train and eval steps: one jax.jit of one shard_map over the mesh.

Per device, inside the shard_map (DESIGN.md, "The train step"):
  1. local gradients of (local CE sum / global token count) w.r.t. params that are
     `pcast` to varying over the data axes, so no implicit gradient all-reduce;
     tensor-parallel collectives come from the layers themselves;
  2. the data-parallel mode sends what crosses the data axes, through the
     configured compressor (parallel/data_parallel.py);
  3. a shard-aware global-norm clip and the optax update of the local shards.
Params are created once from the global definition with `out_shardings`, so every
mesh starts from the same weights.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.mesh import DATA_AXES, active_axes, mesh_shape
from jaxrec.models.recommender import LAYER_SLOT_SCOPE, RecommenderFns
from jaxrec.parallel import device_local, pipeline
from jaxrec.parallel.compression import WARMUP_RATIOS, make_compressor
from jaxrec.parallel.data_parallel import DataParallel, GradientSync, sum_over_stages
from jaxrec.parallel.vma import make_varying, varying_axes
from jaxrec.partitioning import batch_spec, check_divisible, tree_shardings, tree_specs
from jaxrec.train.optim import clip_by_global_norm, lr_schedule, optimizer
from jaxrec.train.state import TrainState, opt_state_specs

Batch = dict[str, jax.Array]
FINAL_PHASE = len(WARMUP_RATIOS)


class TrainProgram:
  """Builds the state layout and the compiled steps for one (config, model, mesh)."""

  def __init__(self, config: ml_collections.ConfigDict, fns: RecommenderFns, mesh: Mesh):
    self.config = config
    self.fns = fns
    self.mesh = mesh
    self.shape = mesh_shape(mesh)
    self.tx = optimizer(config.train, fns.logical_axes)
    self.lr_schedule = lr_schedule(config.train)
    self.microbatches = config.pipeline.microbatches
    self.inject_nonfinite = tuple(
        int(x) for x in str(config.train.inject_nonfinite_steps).split(",") if x.strip())
    # Mesh axes of size > 1: only these appear in specs and collectives.
    self.data_axes = active_axes(self.shape, DATA_AXES)
    self.pipe_axis = "pipe" if self.shape.pipe > 1 else None
    self.tensor_axis = "tensor" if self.shape.tensor > 1 else None
    # Gradients are taken per device over these axes and reduced explicitly: the
    # data axes by the data-parallel mode, `pipe` for params every stage holds.
    self.grad_axes = self.data_axes + ((self.pipe_axis,) if self.pipe_axis else ())
    self.param_specs = tree_specs(fns.logical_axes, self.shape)
    # Stacked layers live in the pipeline's slot layout (the identity without a pipe
    # axis): slots of each device's stages, padded to the longest stage.
    pcfg = config.pipeline
    # The item head on the last stage, or spread over every stage (each scores its
    # share of the catalogue): with "auto" layer counts the balancer picks both.
    self.vocab_axes = tuple(a for a in ("tensor", "pipe") if getattr(self.shape, a) > 1)
    self.balance_plan = None
    counts = pipeline.parse_layers_per_stage(pcfg.layers_per_stage) if self.pipe_axis else "uniform"
    self.head_spread = bool(self.pipe_axis) and pcfg.head == "spread"
    if counts == "auto":
      self.balance_plan = self._balance(pcfg)
      counts = self.balance_plan.layers_per_stage
      self.head_spread = self.balance_plan.head == "spread" if pcfg.head == "auto" else (
          self.head_spread)
    self.layout = pipeline.StageLayout.build(
        fns.cfg.n_layers, self.shape.pipe, pcfg.virtual_stages if self.pipe_axis else 1, counts)
    self.param_shapes = {**fns.shapes, "layers": self.layout.slot_shapes(fns.shapes["layers"])}
    if self.pipe_axis:
      self.schedule = pipeline.Schedule(pcfg.schedule, self.shape.pipe, self.microbatches,
                                        pcfg.virtual_stages)
      self.eval_schedule = pipeline.Schedule(pcfg.schedule, self.shape.pipe, self.shape.pipe,
                                             pcfg.virtual_stages, forward_only=True)
    for path, (shape, spec) in _flat_with_path(self.param_shapes, self.param_specs):
      check_divisible(shape.shape, spec, mesh, f"parameter {path} {shape.shape}")

    self.compressor = make_compressor(config.compression)
    local = device_local.local_shapes(self.param_shapes, self.param_specs, self.shape)
    self.grad_sync = GradientSync(self.compressor, self.shape, local, self.param_specs,
                                  hierarchical=config.compression.hierarchical,
                                  min_size=config.compression.min_size)
    self.dp = DataParallel(config.dp, self.grad_sync, self.shape, self.param_specs,
                           self.param_shapes, self.tx)
    opt_specs = opt_state_specs(self.tx, jax.eval_shape(self.tx.init, self.param_shapes),
                                self.param_specs)
    self.state_specs = TrainState(
        step=P(), params=self.param_specs,
        opt_state={} if self.dp.local else opt_specs,
        dp_state=self.dp.state_specs(opt_specs),
        comp_state=self.grad_sync.state_specs(), rng=P())
    self.state_shardings = tree_shardings(mesh, self.state_specs)
    self._train_steps: dict[int, Any] = {}
    self.eval_ranks = jax.jit(self._eval_ranks)

  def _balance(self, pcfg):
    from jaxrec.parallel import balance
    from jaxrec.perf import hardware
    timed = pcfg.balance_costs == "timed"
    costs = balance.measure(self, None if timed else hardware.get(pcfg.balance_costs),
                            timed=timed)
    heads = ("last", "spread") if pcfg.head == "auto" else (pcfg.head,)
    return balance.plan(costs, self.fns.cfg.n_layers, self.shape.pipe, pcfg.virtual_stages,
                        pcfg.schedule, self.microbatches, heads)

  # ------------------------------------------------------------------ state
  def init_state(self, seed: int) -> TrainState:
    """Identical params on every mesh: created from the global definition, then sharded."""
    def init(key):
      params = self.fns.init(jax.random.fold_in(key, 0))
      params["layers"] = self.layout.to_slots(params["layers"])
      return self.init_state_from(params, jax.random.key_data(key), jnp.int32(0))
    return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(seed))

  def init_state_from(self, params: Any, rng: jax.Array, step: jax.Array) -> TrainState:
    """A fresh optimizer/compressor/mode state around given params (traceable)."""
    opt_state = self.tx.init(params)
    return TrainState(
        step=step, params=params, opt_state={} if self.dp.local else opt_state,
        dp_state=self.dp.init_state(params, opt_state),
        comp_state=self.grad_sync.init_state(
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
    if step is None or not hasattr(self.compressor, "phase"):
      return FINAL_PHASE
    return self.compressor.phase(step)

  def jitted_train_step(self, phase: int = FINAL_PHASE):
    if phase not in self._train_steps:
      self._train_steps[phase] = jax.jit(functools.partial(self._train_step, phase=phase),
                                         donate_argnums=0)
    return self._train_steps[phase]

  def train_step(self, state: TrainState, batch: Batch, step: int | None = None):
    """One optimizer step; `step` (host int) selects the compression warm-up phase."""
    return self.jitted_train_step(self.phase(step))(state, batch)

  def _train_step(self, state: TrainState, batch: Batch, phase: int):
    batch_specs = {k: batch_spec(v.ndim, self.shape) for k, v in batch.items()}
    return jax.shard_map(functools.partial(self._local_train_step, phase=phase),
                         mesh=self.mesh, in_specs=(self.state_specs, batch_specs),
                         out_specs=(self.state_specs, P()))(state, batch)

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

  def _optimize(self, grads, opt_state, params):
    grads, norm = clip_by_global_norm(grads, self.param_specs, self.config.train.grad_clip)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm

  def _local_loss_and_grads(self, state: TrainState, batch: Batch):
    """Mean token CE of the global batch and this device's unreduced gradient."""
    inputs, targets = batch["inputs"], batch["targets"]
    tokens = psum((targets > 0).sum().astype(jnp.float32), self.data_axes)
    row_keys = self._row_keys(state, inputs.shape[0])
    params = self.dp.working_params(state.params, state.dp_state)
    params = make_varying(params, self.grad_axes)
    loss, grads = self._local_grads(params, inputs, targets, row_keys, tokens)
    loss = psum(loss, self.grad_axes)
    if self.pipe_axis:
      grads = sum_over_stages(grads, self.param_specs, self.pipe_axis)
    return loss, grads, tokens

  def loss_and_grads(self, state: TrainState, batch: Batch):
    """(loss, gradients summed over the data axes, uncompressed): what tests compare."""
    batch_specs = {k: batch_spec(v.ndim, self.shape) for k, v in batch.items()}

    def local(s, b):
      loss, grads, _ = self._local_loss_and_grads(s, b)
      return loss, jax.tree.map(lambda g: psum(g, self.data_axes), grads)

    fn = jax.shard_map(local, mesh=self.mesh, in_specs=(self.state_specs, batch_specs),
                       out_specs=(P(), self.param_specs))
    return jax.jit(fn)(state, batch)

  def _device_key(self, state: TrainState) -> jax.Array:
    """A PRNG key per (step, data replica), e.g. for stochastic rounding."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key = jax.random.fold_in(key, 0x5EED)
    return jax.random.fold_in(key, lax.axis_index(self.data_axes)) if self.data_axes else key

  def _data_mean(self, x: jax.Array) -> jax.Array:
    axes = tuple(a for a in self.data_axes if a in varying_axes(x))
    return lax.pmean(x, axes) if axes else x

  def _row_keys(self, state: TrainState, local_batch: int) -> jax.Array | None:
    """One dropout key per global example row, independent of the mesh."""
    if self.fns.cfg.dropout <= 0:
      return None
    first_row = (lax.axis_index(self.data_axes) if self.data_axes else 0) * local_batch
    return row_keys(state.rng, state.step, first_row + jnp.arange(local_batch))

  def _local_grads(self, params, inputs, targets, row_keys, tokens):
    """Sum over microbatches of d(CE sum / tokens)/d params, on this device's rows."""
    def loss_fn(p, inp, tgt, keys):
      ctx = self.fns.context(tensor_axis=self.tensor_axis, row_keys=keys)
      total, _ = self.fns.loss(p, inp, tgt, ctx)
      return total / tokens

    if self.pipe_axis:
      return self._pipeline_grads(params, inputs, targets, row_keys, tokens)
    grad_fn = jax.value_and_grad(loss_fn)
    m = self.microbatches
    if m == 1:
      return grad_fn(params, inputs, targets, row_keys)

    def split(x):
      return None if x is None else x.reshape(m, x.shape[0] // m, *x.shape[1:])

    def body(acc, mb):
      loss, grads = grad_fn(params, *mb)
      return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0.0), params))
    zeros = make_varying(zeros, self.grad_axes)
    (loss, grads), _ = lax.scan(body, zeros, (split(inputs), split(targets), split(row_keys)))
    return loss, grads

  def _pieces(self, head) -> pipeline.StagePieces:
    def ctx(keys):
      keys = None if keys is None else jax.random.wrap_key_data(keys)
      return self.fns.context(tensor_axis=self.tensor_axis, row_keys=keys,
                              dropout_rate=None if keys is not None else 0.0)

    def stage(params, x, aux):
      ids, layer_ids, active, keys = aux
      return self.fns.layers(params, x, ids, ctx(keys), layer_ids, active)

    def lookup(shared, ids):
      return self.fns._items(shared).lookup(ids, ctx(None))

    def accumulate_lookup(table_grad, ids, d_rows):
      return self.fns.scatter_item_grads(table_grad, ids, d_rows, ctx(None))

    return pipeline.StagePieces(
        embed=lambda shared, ids, keys: self.fns.embed(shared, ids, ctx(keys)),
        stage=stage, head=head,
        head_view=lambda shared: self._head_view(shared)[0],
        accumulate_head=self._accumulate_head if self.head_spread else None,
        lookup=lookup,
        embed_rows=lambda shared, rows, ids, keys: self.fns.embed_rows(shared, rows, ids,
                                                                      ctx(keys)),
        accumulate_lookup=accumulate_lookup)

  def _accumulate_head(self, g_shared, d_view):
    """Adds the spread head's gradient: its table slice lands in this stage's rows."""
    table = g_shared["items"]["table"]
    piece = d_view["items"]["table"]
    start = lax.axis_index("pipe") * piece.shape[0]
    table = lax.dynamic_update_slice_in_dim(
        table, lax.dynamic_slice_in_dim(table, start, piece.shape[0], 0) + piece, start, 0)
    out = jax.tree.map(jnp.add, {k: v for k, v in g_shared.items() if k != "items"},
                       {k: v for k, v in d_view.items() if k != "items"})
    return {**out, "items": {**g_shared["items"], "table": table}}

  def _head_view(self, shared):
    """(params, context) the item head runs with: with the spread head, this stage's
    slice of its tensor shard of the item table, reduced over tensor and pipe."""
    if not self.head_spread:
      return shared, self._head_view_context()
    table = shared["items"]["table"]
    rows = table.shape[0] // self.shape.pipe
    piece = lax.dynamic_slice_in_dim(table, lax.axis_index("pipe") * rows, rows, 0)
    return {**shared, "items": {**shared["items"], "table": piece}}, self._head_view_context()

  def _head_view_context(self):
    if not self.head_spread:
      return self.fns.context(tensor_axis=self.tensor_axis, dropout_rate=0.0)
    axes = self.vocab_axes if len(self.vocab_axes) > 1 else self.vocab_axes[0]
    return self.fns.context(tensor_axis=axes, dropout_rate=0.0)

  def _pipeline_grads(self, params, inputs, targets, row_keys, tokens):
    m = self.microbatches

    head_ctx = self._head_view_context()

    def head(view, y, batch):
      return self.fns.head_loss(view, y, batch["targets"], head_ctx)[0] / tokens

    shared = {k: v for k, v in params.items() if k != "layers"}
    keys = None if row_keys is None else pipeline.microbatch(jax.random.key_data(row_keys), m)
    loss, g_stage, g_shared = pipeline.run(
        self.schedule, self.layout, self._pieces(head), params["layers"], shared,
        {"inputs": pipeline.microbatch(inputs, m), "targets": pipeline.microbatch(targets, m)},
        keys, remat=self.config.pipeline.remat, vary_axes=self.data_axes,
        head_spread=self.head_spread)
    return loss, {**g_shared, "layers": g_stage}

  # -------------------------------------------------------------------- eval
  def _eval_ranks(self, params: Any, batch: Batch) -> jax.Array:
    batch_specs = {k: batch_spec(v.ndim, self.shape) for k, v in batch.items()}
    return jax.shard_map(self._local_eval, mesh=self.mesh,
                         in_specs=(self.param_specs, batch_specs),
                         out_specs=batch_spec(1, self.shape))(params, batch)

  def _local_eval(self, params, batch: Batch) -> jax.Array:
    ctx = self.fns.context(tensor_axis=self.tensor_axis, dropout_rate=0.0)
    if not self.pipe_axis:
      h = self.fns.last_hidden(params, batch["inputs"], ctx)
      return self.fns.rank(params, h, batch["target"], batch["exclude"], ctx)

    head_ctx = self._head_view_context()

    def head(view, y, mb):
      h = self.fns.final_hidden(view, y[:, -1])
      return self.fns.rank(view, h, mb["target"], mb["exclude"], head_ctx)

    m = self.eval_schedule.microbatches
    shared = {k: v for k, v in params.items() if k != "layers"}
    out = pipeline.run(self.eval_schedule, self.layout, self._pieces(head), params["layers"],
                       shared, {k: pipeline.microbatch(v, m) for k, v in batch.items()}, None,
                       vary_axes=self.data_axes, head_spread=self.head_spread)
    return lax.psum(out, "pipe").reshape(-1)   # only the last stage wrote its ranks

  # ----------------------------------------------------------------- helpers
  def branch_weights(self) -> dict[str, list[float]]:
    """How often each conditional branch of the train step runs on an average device."""
    weights = dict(self.dp.branch_weights())
    if self.pipe_axis:
      weights.update(self.schedule.branch_weights())
    if self.layout.padded:
      weights[LAYER_SLOT_SCOPE] = [1.0 - self.layout.active_fraction(),
                                   self.layout.active_fraction()]
    return weights

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, batch_spec(ndim, self.shape))


def psum(x: Any, axes: tuple[str, ...]) -> Any:
  """psum over the given (active) axes; nothing to do when there are none."""
  return lax.psum(x, axes) if axes else x


def row_keys(rng: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
  """Dropout keys for global batch rows `rows` at `step` (raw uint32 base key)."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows)


def _flat_with_path(shapes: Any, specs: Any):
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, shape), spec in zip(flat_shapes, flat_specs):
    yield jax.tree_util.keystr(path), (shape, spec)
