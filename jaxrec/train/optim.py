"""AdamW with warm-up + cosine decay, and a global-norm clip that knows about shards.

`optax.clip_by_global_norm` inside shard_map would see only the local shard of a
tensor- or pipeline-sharded gradient, so each device would clip by a different
norm. `clip_by_global_norm` here sums squares per shard and all-reduces them over
exactly the mesh axes each leaf is sharded over.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrec.partitioning import spec_mesh_axes


def lr_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `lr` over `warmup_steps` (step 0 already moves: lr/warmup),
  then cosine decay to `lr * min_lr_ratio` at `steps`."""
  warmup = max(int(train.warmup_steps), 1)
  decay = max(int(train.steps) - warmup, 1)
  peak, floor = float(train.lr), float(train.lr) * float(train.min_lr_ratio)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / warmup)
    frac = jnp.clip((step + 1.0 - warmup) / decay, 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step + 1.0 < warmup, warm, cosine)

  return schedule


def optimizer(train: ml_collections.ConfigDict, logical_axes: Any,
              param_dtype: str = "float32",
              table_optimizer: str = "adamw") -> optax.GradientTransformation:
  """AdamW (decay on params with >= 2 non-layer logical axes), or plain SGD, under the
  precision policy: Adam's moments stored in `train.opt_state_dtype`, and with bf16
  params an fp32 master copy in the optimizer state (`train.master_weights`), the
  stored params being its rounding (Levanter/jmp-style: storage, compute and
  optimizer dtypes chosen separately). The item table may have its own sparse
  optimizer (`embedding.optimizer`): lazy Adam or row-wise Adagrad."""
  if train.optimizer == "sgd":
    tx = optax.sgd(lr_schedule(train))
  else:
    mask = jax.tree.map(lambda axes: len([a for a in axes if a != "layers"]) >= 2,
                        logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    tx = optax.adamw(lr_schedule(train), b1=train.b1, b2=train.b2, eps=train.adam_eps,
                     weight_decay=train.weight_decay, mask=mask)
    if table_optimizer != "adamw":
      table = (lazy_adam(lr_schedule(train), train.b1, train.b2, train.adam_eps,
                         train.weight_decay)
               if table_optimizer == "lazy_adam" else rowwise_adagrad(lr_schedule(train)))
      labels = jax.tree_util.tree_map_with_path(
          lambda path, _: "table" if _is_table(path) else "dense", logical_axes,
          is_leaf=lambda x: isinstance(x, tuple))
      tx = optax.multi_transform({"table": table, "dense": tx}, labels)
  if train.get("opt_state_dtype", "float32") != "float32":
    tx = stored_as(tx, jnp.dtype(train.opt_state_dtype))
  if param_dtype != "float32" and train.get("master_weights", True):
    tx = with_master_weights(tx)
  return tx


def _is_table(path) -> bool:
  return [getattr(k, "key", None) for k in path] == ["items", "table"]


def _touched(g: jax.Array) -> jax.Array:
  """[R, 1]: rows whose gradient is not all zero (the rows a batch looked up)."""
  return jnp.any(g != 0, axis=-1, keepdims=True)


class LazyAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def lazy_adam(lr: optax.Schedule, b1: float, b2: float, eps: float,
              weight_decay: float) -> optax.GradientTransformation:
  """Adam whose moments, update and decoupled weight decay touch only the rows with
  a gradient this step (TF's LazyAdam; bias correction by the global step): rows no
  batch looked up keep their values and moments exactly."""
  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return LazyAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

  def update(grads, state, params):
    count = state.count + 1
    rate = lr(state.count)

    def leaf(g, m, v, p):
      on = _touched(g)
      m = jnp.where(on, b1 * m + (1 - b1) * g, m)
      v = jnp.where(on, b2 * v + (1 - b2) * g * g, v)
      m_hat = m / (1 - b1 ** count.astype(jnp.float32))
      v_hat = v / (1 - b2 ** count.astype(jnp.float32))
      u = -rate * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * p)
      return jnp.where(on, u, 0.0).astype(p.dtype), m, v

    flat, treedef = jax.tree.flatten(grads)
    out = [leaf(*args) for args in zip(flat, *(treedef.flatten_up_to(t)
                                               for t in (state.mu, state.nu, params)))]
    updates, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return updates, LazyAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


class RowwiseAdagradState(NamedTuple):
  sum_sq: Any   # [R, 1] per leaf: one accumulator per row


def rowwise_adagrad(lr: optax.Schedule, eps: float = 1e-8) -> optax.GradientTransformation:
  """Row-wise Adagrad (FBGEMM / TorchRec, HSTU's DLRM-v3 tables): one accumulator per
  row, the mean squared gradient of the row added each step it is touched."""
  def init(params):
    return RowwiseAdagradState(jax.tree.map(lambda p: jnp.zeros((p.shape[0], 1), p.dtype),
                                            params)), jnp.zeros((), jnp.int32)

  def update(grads, state, params=None):
    del params
    acc, count = state
    acc = jax.tree.map(lambda a, g: a + jnp.mean(g * g, axis=-1, keepdims=True),
                       acc.sum_sq, grads)
    rate = lr(count)
    updates = jax.tree.map(lambda g, a: -rate * g / (jnp.sqrt(a) + eps), grads, acc)
    return updates, (RowwiseAdagradState(acc), count + 1)

  return optax.GradientTransformation(init, update)


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
      tree)


def stored_as(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` with its floating state stored in `dtype` and updated in fp32."""
  def init(params):
    return _cast_floats(tx.init(params), dtype)

  def update(grads, state, params=None):
    updates, state = tx.update(grads, _cast_floats(state, jnp.float32), params)
    return updates, _cast_floats(state, dtype)

  return optax.GradientTransformation(init, update)


class MasterState(NamedTuple):
  master: Any      # fp32 copy of the params: what the optimizer really updates
  inner: Any


def with_master_weights(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Keeps an fp32 master copy of low-precision params in the optimizer state; the
  updates it returns move the stored params to the master's rounding, so small
  steps are not lost to bf16's 8-bit mantissa."""
  def init(params):
    master = _cast_floats(params, jnp.float32)
    return MasterState(master, tx.init(master))

  def update(grads, state, params):
    updates, inner = tx.update(_cast_floats(grads, jnp.float32), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    to_master = jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params)
    return to_master, MasterState(master, inner)

  return optax.GradientTransformation(init, update)


def global_norm(tree: Any, specs: Any) -> jax.Array:
  """sqrt(sum of squares) of a tree of local shards, reduced over their sharded axes.

  Call inside shard_map; leaves replicated over an axis are counted once.
  """
  groups: dict[tuple[str, ...], jax.Array] = defaultdict(lambda: jnp.float32(0.0))
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)):
    axes = tuple(sorted(spec_mesh_axes(spec)))
    groups[axes] = groups[axes] + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  total = jnp.float32(0.0)
  for axes, sq in groups.items():
    total = total + (lax.psum(sq, axes) if axes else sq)
  return jnp.sqrt(total)


def clip_by_global_norm(tree: Any, specs: Any, max_norm: float,
                        groups: Any = None) -> tuple[Any, jax.Array]:
  """Clips `tree` to `max_norm`; returns (clipped, norm before clipping).

  `groups` (a tree of bools like `tree`) clips the True and the False leaves each
  by their own norm: the local data-parallel modes clip a replica's local gradient
  without letting it rescale the synced table's shared one (and vice versa)."""
  if groups is None:
    norm = global_norm(tree, specs)
    if max_norm <= 0:
      return tree, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), tree), norm
  flags = jax.tree.leaves(groups)
  leaves, spec_leaves = jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)
  norms = {want: global_norm([x for x, on in zip(leaves, flags) if on == want],
                             [s for s, on in zip(spec_leaves, flags) if on == want])
           for want in (True, False)}
  norm = jnp.sqrt(norms[True] ** 2 + norms[False] ** 2)
  if max_norm <= 0:
    return tree, norm
  scales = {k: jnp.minimum(1.0, max_norm / (n + 1e-6)) for k, n in norms.items()}
  return jax.tree.map(lambda g, on: g * scales[on].astype(g.dtype), tree, groups), norm


def _is_spec(x) -> bool:
  return isinstance(x, P)
