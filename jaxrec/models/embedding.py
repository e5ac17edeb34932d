"""The item table: vocab-parallel lookup, tied softmax cross-entropy and ranking.

In a recommender the item catalogue is the big matrix. Its rows are split over
the tensor axis; no function here ever materialises the whole table or the full
(tokens x items) logits on one device. Row 0 is padding and rows past the
catalogue are padding too (the table is padded to a fixed multiple so its shape
does not depend on the mesh); neither can be a target or win a ranking.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.models.layers import Context, param
from jaxrec.parallel import tensor

NEG = -1e30


def padded_table_rows(num_items: int, multiple: int) -> int:
  return int(math.ceil((num_items + 1) / multiple) * multiple)


class ItemEmbedding(nnx.Module):
  def __init__(self, num_items: int, d_model: int, multiple: int, init_std: float,
               rngs: nnx.Rngs):
    self.num_items = num_items
    rows = padded_table_rows(num_items, multiple)
    table = nnx.initializers.normal(init_std)(rngs.params(), (rows, d_model))
    valid = (jnp.arange(rows) >= 1) & (jnp.arange(rows) <= num_items)
    self.table = nnx.Param(jnp.where(valid[:, None], table, 0.0),
                           out_sharding=("items", "embed"), eager_sharding=False)

  def _local(self, ctx: Context):
    table = self.table[...]
    start = tensor.shard_offset(table.shape[0], ctx.tensor_axis)
    ids = start + jnp.arange(table.shape[0])
    valid = (ids >= 1) & (ids <= self.num_items)
    return table, start, valid

  def lookup(self, ids: jax.Array, ctx: Context) -> jax.Array:
    """Embeds ids [...]: each shard contributes its rows, one all-reduce joins them."""
    table, start, _ = self._local(ctx)
    local = ids - start
    inside = (local >= 0) & (local < table.shape[0])
    rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
    rows = jnp.where(inside[..., None], rows, 0).astype(ctx.dtype)
    return tensor.all_reduce(rows, ctx.tensor_axis)

  def local_logits(self, h: jax.Array, ctx: Context) -> jax.Array:
    """Scores of this shard's items [N, local_rows] in fp32; padding rows at -1e30."""
    table, _, valid = self._local(ctx)
    logits = jnp.einsum("nd,vd->nv", h.astype(ctx.dtype), table.astype(ctx.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.where(valid[None], logits, NEG)

  def cross_entropy(self, h: jax.Array, targets: jax.Array, ctx: Context) -> jax.Array:
    """Full-softmax CE over the whole catalogue per row of h [N, D] (targets [N]).

    log-sum-exp from a max all-reduce and a sum all-reduce of local partials; the
    target logit from the shard that holds it. Rows with target 0 return garbage
    the caller masks.
    """
    logits = self.local_logits(h, ctx)
    m = tensor.all_max(lax.stop_gradient(logits.max(-1)), ctx.tensor_axis)
    sumexp = tensor.all_reduce(jnp.exp(logits - m[:, None]).sum(-1), ctx.tensor_axis)
    lse = jnp.log(sumexp) + m
    target_logit = _gather_local(logits, targets, ctx.tensor_axis)
    return lse - target_logit

  def target_rank(self, h: jax.Array, target: jax.Array, exclude: jax.Array,
                  ctx: Context) -> jax.Array:
    """0-based rank of `target` among all items for rows of h [N, D].

    Items in `exclude` [N, H] (the user's history; 0 = none) are removed unless they
    are the target. Ties count against the target, so a constant scorer ranks last.
    """
    scores = self._masked_scores(h, target, exclude, ctx)
    t = _gather_local(scores, target, ctx.tensor_axis)
    greater = tensor.all_reduce((scores > t[:, None]).sum(-1), ctx.tensor_axis)
    ties = tensor.all_reduce((scores == t[:, None]).sum(-1), ctx.tensor_axis) - 1
    return greater + jnp.maximum(ties, 0)

  def top_k(self, h: jax.Array, k: int, exclude: jax.Array, ctx: Context):
    """Top-k item ids and scores over the whole catalogue: local top-k per shard,
    then an all-gather of k candidates per shard and a final top-k."""
    no_target = jnp.zeros(h.shape[:1], jnp.int32)
    scores = self._masked_scores(h, no_target, exclude, ctx)
    _, start, _ = self._local(ctx)
    k_local = min(k, scores.shape[-1])
    vals, idx = lax.top_k(scores, k_local)
    ids = (idx + start).astype(jnp.int32)
    if ctx.tensor_axis is not None:
      vals = lax.all_gather(vals, ctx.tensor_axis, axis=1, tiled=True, to="invarying")
      ids = lax.all_gather(ids, ctx.tensor_axis, axis=1, tiled=True, to="invarying")
    vals, pos = lax.top_k(vals, min(k, vals.shape[-1]))
    return jnp.take_along_axis(ids, pos, -1), vals

  def _masked_scores(self, h, target, exclude, ctx):
    scores = self.local_logits(h, ctx)
    _, start, _ = self._local(ctx)
    local = exclude - start
    drop = (exclude > 0) & (exclude != target[:, None])
    inside = drop & (local >= 0) & (local < scores.shape[-1])
    col = jnp.where(inside, local, scores.shape[-1])   # out of range -> dropped
    rows = jnp.arange(scores.shape[0])[:, None]
    return scores.at[rows, col].set(NEG, mode="drop")


def _gather_local(values: jax.Array, ids: jax.Array, axis) -> jax.Array:
  """values[n, ids[n]] for ids in global numbering, values sharded by columns."""
  start = tensor.shard_offset(values.shape[-1], axis)
  local = ids - start
  inside = (local >= 0) & (local < values.shape[-1])
  picked = jnp.take_along_axis(values, jnp.where(inside, local, 0)[:, None], -1)[:, 0]
  return tensor.all_reduce(jnp.where(inside, picked, 0.0), axis)
