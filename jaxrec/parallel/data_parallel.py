"""Data parallelism: how gradients (or parameter deltas) cross the data axes.

The train step differentiates w.r.t. params `pcast` to varying over the data
axes, so JAX inserts no gradient all-reduce of its own (DESIGN.md, "the
compression trap"); everything that crosses the data axes is sent here, through
the configured compressor.

Modes (`config.dp.mode`):
  sync       reduce every step, then update.
  delayed    step t applies the reduced gradient of step t-1; the reduction reads
             only the previous step's stored local gradient, so it has no
             dependency on this step's forward/backward and can overlap it.
             Step 0 only stores its gradient, so delayed == sync shifted by one.
  local_sgd  every replica updates its own copy for H steps (no data-axis traffic),
             then the anchor moves by the replicas' mean delta (the deltas may be
             compressed), or by that times sqrt(R) (`dp.local_sgd_step`: per-replica
             Adam steps are up to sqrt(R) too short; config.py says when it helps).
  diloco     as local_sgd, but the averaged delta is the gradient of an outer
             Nesterov-momentum SGD step on the shared parameters (Douillard et al.).
Per-replica copies live in arrays sharded over the data axes, so checkpoints hold
them like any other state. In the local modes a leaf that is itself split over the
data axes (the rows-sharded item table, `embedding.sharding = 'rows'`) has no
per-replica copy: its sparse gradient already reaches its one owner every step
through the lookup's exchange, so it is updated every step like `sync` — the
hybrid: the table synchronous and sparse, the dense layers local.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrec.config import LOCAL_MODES
from jaxrec.mesh import DATA_AXES, MeshShape
from jaxrec.parallel import collectives, device_local
from jaxrec.parallel.compression import FINAL_PHASE, Compressor, NoCompression, ReduceArgs
from jaxrec.parallel.vma import make_varying
from jaxrec.partitioning import spec_mesh_axes

# Name scopes of the mode's conditionals, for the HLO accounting's branch weights.
DELAYED_SCOPE = "dp_update_after_first_step"
AVERAGE_SCOPE = "dp_average_every_h"

# (grads, opt_state, params, synced leaves or None) -> (params, opt_state, grad norm);
# with a synced mask, synced and local leaves are clipped by their own norms.
Optimize = Callable[[Any, Any, Any, Any], tuple[Any, Any, jax.Array]]


def sum_over_stages(grads: Any, specs: Any, axis: str = "pipe") -> Any:
  """Sums gradients of params that every pipeline stage holds (item table, norms).

  Stage-sharded leaves (the stacked layers) keep their per-stage gradient.
  """
  def reduce(g, spec):
    return g if axis in spec_mesh_axes(spec) else lax.psum(g, axis)
  return jax.tree.map(reduce, grads, specs)


class GradientSync:
  """Sums a tree of per-device tensors over the data axes through a compressor.

  With `hierarchical`, tensors are first reduce-scattered uncompressed over `data`
  (fast links) and only each device's chunk is compressed across `replica` (the
  slow links), then all-gathered over `data`.
  """

  def __init__(self, compressor: Compressor, mesh: MeshShape, local_shapes: Any,
               param_specs: Any, hierarchical: bool = False, min_size: int = 0):
    self.compressor = compressor
    self.min_size = min_size
    self.mesh = mesh
    self.data_axes = tuple(a for a in DATA_AXES if getattr(mesh, a) > 1)
    self.hierarchical = hierarchical and mesh.replica > 1 and mesh.data > 1
    if self.hierarchical:
      self.inner, self.outer = ("data",), ("replica",)
    else:
      self.inner, self.outer = (), self.data_axes
    self.group = math.prod(getattr(mesh, a) for a in self.outer)
    self.local_shapes = local_shapes
    shapes, self.treedef = jax.tree.flatten(local_shapes, is_leaf=_is_shape)
    specs = self.treedef.flatten_up_to(param_specs)
    # per leaf: (local shape, mesh axes its per-device state differs over)
    self.leaves = [(shape, device_local.leaf_axes(spec, self.data_axes))
                   for shape, spec in zip(shapes, specs)]
    # A leaf split over data axes (the rows-sharded item table) is not replicated
    # there: its gradient arrives whole on its owner (the lookup's sparse exchange),
    # so nothing of it crosses those axes here. Over the data axes it is *not* split
    # over (replica, unless embedding.shard_replica) its copies are summed in fp32.
    self.owned = [bool(spec_mesh_axes(spec) & set(self.data_axes)) for spec in specs]
    self.owned_rest = [tuple(a for a in self.data_axes if a not in spec_mesh_axes(spec))
                       for spec in specs]

  def compressor_for(self, shape: tuple[int, ...]) -> Compressor:
    """Small tensors (norm scales, biases) go uncompressed."""
    return self.compressor if math.prod(shape) >= self.min_size else NoCompression()

  def _compressed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """What the compressor sees: the whole local tensor, or with `hierarchical` this
    device's chunk after the reduce-scatter over `data` — a block of matrix rows
    for PowerSGD when the rows divide evenly, else a flat chunk."""
    if not self.inner:
      return shape
    compressor = self.compressor_for(shape)
    matrix = None if compressor.flat else compressor.matrix_shape(shape)
    if matrix is not None and matrix[0] % self.mesh.data == 0:
      return (matrix[0] // self.mesh.data, matrix[1])
    return (collectives.chunk_len(math.prod(shape), self.mesh.data),)

  # ------------------------------------------------------------------ state
  def _leaf_state(self, shape, owned: bool = False):
    if owned:
      return {}
    return self.compressor_for(shape).state_shapes(self._compressed_shape(shape), self.group)

  def state_shapes(self) -> Any:
    """Per-leaf dict of (global device-local shape, dtype)."""
    return self.treedef.unflatten([
        {k: (device_local.global_shape(self.mesh, s, axes), d)
         for k, (s, d) in self._leaf_state(shape, owned).items()}
        for (shape, axes), owned in zip(self.leaves, self.owned)])

  def state_specs(self) -> Any:
    return self.treedef.unflatten([
        {k: device_local.spec(self.mesh, len(s), axes)
         for k, (s, _) in self._leaf_state(shape, owned).items()}
        for (shape, axes), owned in zip(self.leaves, self.owned)])

  def init_state(self, key: jax.Array) -> Any:
    states = []
    for i, (shape, axes) in enumerate(self.leaves):
      if self.owned[i]:
        states.append({})
        continue
      local = self.compressor_for(shape).init_state(
          self._compressed_shape(shape), self.group, jax.random.fold_in(key, i))
      states.append({k: device_local.broadcast(self.mesh, v, axes) for k, v in local.items()})
    return self.treedef.unflatten(states)

  def pending_shapes(self) -> Any:
    """Per-device fp32 copies of the gradient leaves (the delayed mode's buffer)."""
    return self.treedef.unflatten([
        device_local.global_shape(self.mesh, shape, axes) for shape, axes in self.leaves])

  def pending_specs(self) -> Any:
    return self.treedef.unflatten([
        device_local.spec(self.mesh, len(shape), axes) for shape, axes in self.leaves])

  def unwrap_leaves(self, tree: Any) -> Any:
    return self.treedef.unflatten([device_local.unwrap(x, axes) for x, (_, axes) in zip(
        self.treedef.flatten_up_to(tree), self.leaves)])

  def wrap_leaves(self, tree: Any) -> Any:
    """Local values -> device-local layout, typed varying over each leaf's state axes."""
    return self.treedef.unflatten([
        make_varying(device_local.wrap(x, axes), self._active(axes))
        for x, (_, axes) in zip(self.treedef.flatten_up_to(tree), self.leaves)])

  def _active(self, axes):
    return tuple(a for a in axes if getattr(self.mesh, a) > 1)

  def analytic_bytes(self, phase: int = FINAL_PHASE) -> dict[str, tuple[float, float]]:
    """Expected (buffer, ring-wire) bytes per reduction, keyed by the axes they cross."""
    out: dict[str, list[float]] = {}
    if not self.data_axes:
      return {}

    def add(axes, payload, wire):
      key = ",".join(axes)
      acc = out.setdefault(key, [0.0, 0.0])
      acc[0] += payload
      acc[1] += wire

    d = self.mesh.data
    for (shape, _), owned, rest in zip(self.leaves, self.owned, self.owned_rest):
      if owned:
        if rest:   # fp32 all-reduce of the owned shard over the axes it is copied on
          group = math.prod(getattr(self.mesh, a) for a in rest)
          payload = 4.0 * math.prod(shape)
          add(rest, payload, 2 * (group - 1) / group * payload)
        continue
      compressor = self.compressor_for(shape)
      if self.inner:  # fp32 reduce-scatter + all-gather over data, compressed chunk across
        padded = 4.0 * d * collectives.chunk_len(math.prod(shape), d)
        add(self.inner, 2 * padded, 2 * (d - 1) / d * padded)
        add(self.outer, *compressor.collective_bytes(self._compressed_shape(shape),
                                                     self.group, phase))
      else:
        add(self.outer, *compressor.collective_bytes(shape, self.group, phase))
    return {k: (v[0], v[1]) for k, v in out.items()}

  # ----------------------------------------------------------------- reduce
  def __call__(self, tree: Any, state: Any, key: jax.Array | None = None,
               phase: int = FINAL_PHASE) -> tuple[Any, Any]:
    """Inside shard_map: (sum over the data axes of `tree`, new state)."""
    if not self.data_axes:
      return jax.tree.map(lambda g: g.astype(jnp.float32), tree), state
    leaves = self.treedef.flatten_up_to(tree)
    states = self.treedef.flatten_up_to(state)
    out, new_states = [], []
    for i, (g, st, (shape, axes)) in enumerate(zip(leaves, states, self.leaves)):
      if self.owned[i]:
        g = g.astype(jnp.float32)
        out.append(lax.psum(g, self.owned_rest[i]) if self.owned_rest[i] else g)
        new_states.append(st)
        continue
      compressor = self.compressor_for(shape)
      local_state = {k: device_local.unwrap(v, axes) for k, v in st.items()}
      leaf_key = None if key is None else jax.random.fold_in(key, i)
      holder = {}

      def reduce_outer(x, compressor=compressor, local_state=local_state, leaf_key=leaf_key,
                       holder=holder):
        total, holder["state"] = compressor.reduce(
            x.astype(jnp.float32), local_state, ReduceArgs(self.outer, leaf_key, phase))
        return total

      if self.inner:
        cshape = self._compressed_shape(shape)
        total = collectives.hierarchical_all_reduce(
            g, self.inner, self.outer,
            lambda chunk, cshape=cshape, reduce_outer=reduce_outer:
                reduce_outer(chunk.reshape(cshape)).reshape(-1))
      else:
        total = reduce_outer(g)
      new = {k: device_local.wrap(v, axes) for k, v in holder["state"].items()}
      out.append(total)
      new_states.append(make_varying(new, self._active(axes)))
    return self.treedef.unflatten(out), self.treedef.unflatten(new_states)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def synced_leaves(specs: Any, data_axes: tuple[str, ...]) -> Any:
  """Per leaf: is it split over a data axis (one owner, updated every step)?"""
  return jax.tree.map(lambda s: bool(spec_mesh_axes(s) & set(data_axes)), specs,
                      is_leaf=_is_spec)


def replica_specs(param_specs: Any, mesh: MeshShape) -> Any:
  """Specs of per-replica copies [data_size, *param]: leading dim over the data axes."""
  axes = tuple(a for a in DATA_AXES if getattr(mesh, a) > 1)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return jax.tree.map(lambda s: P(lead, *s), param_specs, is_leaf=lambda x: isinstance(x, P))


class DataParallel:
  """One data-parallel mode: what state it keeps and how a step's gradients apply."""

  def __init__(self, dp: ml_collections.ConfigDict, sync: GradientSync, mesh: MeshShape,
               param_specs: Any, param_shapes: Any, tx: optax.GradientTransformation,
               opt_specs: Any):
    self.mode = dp.mode
    self.every = max(int(dp.sync_every), 1)
    self.sync = sync
    self.mesh = mesh
    self.param_specs = param_specs
    self.param_shapes = param_shapes
    self.tx = tx
    self.outer_tx = optax.sgd(dp.outer_lr, momentum=dp.outer_momentum or None,
                              nesterov=dp.outer_momentum > 0)
    self.data_size = mesh.data_size
    self.local_step = (math.sqrt(self.data_size) if dp.local_sgd_step == "sqrt_replicas"
                       else 1.0)
    self.local_warmup = int(dp.local_sgd_warmup)
    self.data_axes = sync.data_axes
    # Leaves split over the data axes have one owner, not a copy per replica.
    self.synced = synced_leaves(param_specs, self.data_axes)
    self.opt_synced = synced_leaves(opt_specs, self.data_axes)

  @property
  def local(self) -> bool:
    return self.mode in LOCAL_MODES

  def branch_weights(self) -> dict[str, list[float]]:
    """How often each branch of this mode's conditionals runs per step (steady state)."""
    if self.mode == "delayed":
      return {DELAYED_SCOPE: [0.0, 1.0]}
    if self.local:
      return {AVERAGE_SCOPE: [1.0 - 1.0 / self.every, 1.0 / self.every]}
    return {}

  # ------------------------------------------------------------------ state
  def init_state(self, params: Any, opt_state: Any) -> Any:
    """dp_state at step 0 (global arrays; jit with out_shardings)."""
    if self.mode == "delayed":
      return {"pending": jax.tree.map(lambda s: jnp.zeros(s, jnp.float32),
                                      self.sync.pending_shapes(), is_leaf=_is_shape)}
    if self.local:
      state = self.replicate(params, opt_state)
      if self.mode == "diloco":
        state["outer_opt"] = self.outer_tx.init(params)
      return state
    return {}

  def state_specs(self, opt_specs: Any) -> Any:
    if self.mode == "delayed":
      return {"pending": self.sync.pending_specs()}
    if self.local:
      params = replica_specs(self.param_specs, self.mesh)
      opt = replica_specs(opt_specs, self.mesh)
      specs = {"local_params": jax.tree.map(lambda s, on: None if on else s, params,
                                            self.synced, is_leaf=_is_spec),
               "local_opt": jax.tree.map(lambda s, o, on: o if on else s, opt, opt_specs,
                                         self.opt_synced, is_leaf=_is_spec)}
      if self.mode == "diloco":
        outer_shapes = jax.eval_shape(self.outer_tx.init, self.param_shapes)
        specs["outer_opt"] = optax.tree_map_params(
            self.outer_tx, lambda _, s: s, outer_shapes, self.param_specs,
            transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
      return specs
    return {}

  # ------------------------------------------------------------------- step
  def working_params(self, params: Any, dp_state: Any) -> Any:
    """The params this device differentiates: its own replica's in the local modes
    (and the shared synced leaves)."""
    if self.local:
      return jax.tree.map(lambda p, x: p if x is None else x[0], params,
                          dp_state["local_params"])
    return params

  def replicate(self, params: Any, opt_state: Any) -> dict[str, Any]:
    """One copy of params and inner optimizer state -> the per-replica copies
    (global arrays; the synced leaves stay single: no params copy, one state)."""
    rep = lambda x: jnp.broadcast_to(x, (self.data_size, *x.shape))  # noqa: E731
    return {"local_params": jax.tree.map(lambda x, on: None if on else rep(x), params,
                                         self.synced),
            "local_opt": jax.tree.map(lambda x, on: x if on else rep(x), opt_state,
                                      self.opt_synced)}

  def collapse(self, params: Any, dp_state: Any) -> tuple[Any, Any]:
    """The per-replica copies (global arrays) -> one copy of params and inner
    optimizer state: their mean, the synced leaves as they are."""
    local = jax.tree.map(lambda p, x: p if x is None else x.mean(axis=0), params,
                         dp_state["local_params"])
    opt = jax.tree.map(lambda x, on: x if on else x.mean(axis=0), dp_state["local_opt"],
                       self.opt_synced)
    return local, opt

  def local_step_at(self, step: jax.Array) -> jax.Array:
    """local_sgd's factor on the mean delta at the average after `step`: ramps from 1
    to `local_step` over `local_warmup` steps."""
    if self.local_warmup <= 0:
      return jnp.float32(self.local_step)
    ramp = jnp.minimum((step + 1).astype(jnp.float32) / self.local_warmup, 1.0)
    return 1.0 + (self.local_step - 1.0) * ramp

  def apply(self, grads: Any, params: Any, opt_state: Any, dp_state: Any, comp_state: Any,
            step: jax.Array, optimize: Optimize, key: jax.Array | None, phase: int):
    """grads: this device's gradient of (its CE sum / global tokens), varying over data.

    Returns (params, opt_state, dp_state, comp_state, grad_norm).
    """
    if self.mode == "sync":
      total, comp_state = self.sync(grads, comp_state, key, phase)
      params, opt_state, norm = optimize(total, opt_state, params, None)
      return params, opt_state, dp_state, comp_state, norm
    if self.mode == "delayed":
      previous = self.sync.unwrap_leaves(dp_state["pending"])
      total, comp_state = self.sync(previous, comp_state, key, phase)
      with jax.named_scope(DELAYED_SCOPE):
        params, opt_state, norm = lax.cond(
            step > 0, lambda: optimize(total, opt_state, params, None),
            lambda: (params, opt_state, jnp.zeros((), jnp.float32)))
      pending = self.sync.wrap_leaves(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
      return params, opt_state, {"pending": pending}, comp_state, norm
    anchor, dp_state, comp_state, norm = self._apply_local(
        grads, params, dp_state, comp_state, step, optimize, key, phase)
    return anchor, opt_state, dp_state, comp_state, norm

  def _apply_local(self, grads, anchor, dp_state, comp_state, step, optimize, key, phase):
    # A replica's gradient of (its CE sum / global tokens) times the replica count is
    # an unbiased estimate of the global mean gradient: one local step is then a
    # full-size step, and under SGD averaging replicas after one step equals a sync
    # step (under Adam it does not: each replica normalises its own noisier gradient).
    # A synced leaf's gradient is already the global one (summed on its owner).
    grads = jax.tree.map(lambda g, on: g if on else g * self.data_size, grads, self.synced)
    local_params = self.working_params(anchor, dp_state)
    local_opt = jax.tree.map(lambda x, on: x if on else x[0], dp_state["local_opt"],
                             self.opt_synced)
    local_params, local_opt, norm = optimize(grads, local_opt, local_params, self.synced)
    # Synced leaves move every step, so their delta below is zero: local SGD leaves
    # them alone, and DiLoCo's outer momentum on them stays zero.
    anchor = jax.tree.map(lambda a, p, on: p if on else a, anchor, local_params,
                          self.synced)
    outer_opt = dp_state.get("outer_opt")

    def average(anchor, outer_opt, comp_state, local_params):
      delta = jax.tree.map(lambda a, p: a - p, anchor, local_params)
      total, comp_state = self.sync(delta, comp_state, key, phase)
      mean_delta = jax.tree.map(lambda d: d / self.data_size, total)
      if self.mode == "diloco":
        updates, outer_opt = self.outer_tx.update(mean_delta, outer_opt, anchor)
        anchor = optax.apply_updates(anchor, updates)
      else:
        scale = self.local_step_at(step)
        anchor = jax.tree.map(lambda a, d: a - scale.astype(d.dtype) * d, anchor, mean_delta)
      synced = make_varying(anchor, self.data_axes)
      return anchor, outer_opt, comp_state, synced

    def keep(anchor, outer_opt, comp_state, local_params):
      return anchor, outer_opt, comp_state, local_params

    with jax.named_scope(AVERAGE_SCOPE):
      anchor, outer_opt, comp_state, local_params = lax.cond(
          (step + 1) % self.every == 0, average, keep, anchor, outer_opt, comp_state,
          local_params)
    new = {"local_params": jax.tree.map(lambda x, on: None if on else x[None], local_params,
                                        self.synced),
           "local_opt": jax.tree.map(lambda x, on: x if on else x[None], local_opt,
                                     self.opt_synced)}
    if outer_opt is not None:
      new["outer_opt"] = outer_opt
    return anchor, new, comp_state, norm
