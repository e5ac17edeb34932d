"""The item table: vocab-parallel lookup and full-catalogue ranking, tile by tile.

In a recommender the item catalogue is the big matrix. Its rows are split over
the tensor axis (or tensor x pipe for the spread head); no function here ever
materialises the whole table or a [tokens, items] score matrix on one device:
ranking and top-k walk the shard's rows in tiles (the losses in models/losses.py do
the same). Row 0 is padding and rows past the catalogue are padding too (the table
is padded to a fixed multiple so its shape does not depend on the mesh); neither
can be a target or win a ranking.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.models.layers import Context
from jaxrec.parallel import tensor
from jaxrec.parallel.vma import make_varying, varying_axes

NEG = -1e30
RANK_TILE = 4096    # items scored per tile when ranking / taking top-k


def padded_table_rows(num_items: int, multiple: int) -> int:
  return int(math.ceil((num_items + 1) / multiple) * multiple)


class ItemEmbedding(nnx.Module):
  def __init__(self, num_items: int, d_model: int, multiple: int, init_std: float,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.num_items = num_items
    rows = padded_table_rows(num_items, multiple)
    table = nnx.initializers.normal(init_std)(rngs.params(), (rows, d_model))
    valid = (jnp.arange(rows) >= 1) & (jnp.arange(rows) <= num_items)
    self.table = nnx.Param(jnp.where(valid[:, None], table, 0.0).astype(param_dtype),
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
    """Scores of this shard's items [N, local_rows] in fp32; padding rows at -1e30.
    The whole shard at once: for tests and small catalogues only."""
    table, _, valid = self._local(ctx)
    logits = jnp.einsum("nd,vd->nv", h.astype(ctx.dtype), table.astype(ctx.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.where(valid[None], logits, NEG)

  def _tiles(self, h: jax.Array, exclude: jax.Array, keep: jax.Array, ctx: Context,
             normalize: bool = False):
    """(tile function, tile count): tile k -> (global ids [tile], scores [N, tile]) with
    padding rows and the excluded ids (exclude [N, H], 0 = none; not where `keep`
    [N, H]) at -1e30. A last partial tile overlaps its predecessor; re-read rows
    score -inf so nothing is counted twice."""
    table, start, _ = self._local(ctx)
    rows = table.shape[0]
    tile = min(RANK_TILE, rows)
    drop = (exclude > 0) & ~keep

    def scores_of(k):
      lo = jnp.minimum(k * tile, rows - tile)
      w = lax.dynamic_slice_in_dim(table, lo, tile, 0)
      if normalize:   # cosine ranking for a model trained on L2-normalised rows
        w = w * lax.rsqrt(jnp.maximum((w.astype(jnp.float32) ** 2).sum(-1, keepdims=True),
                                      1e-12)).astype(w.dtype)
      local = lo + jnp.arange(tile)
      ids = start + local
      valid = (local >= k * tile) & (ids >= 1) & (ids <= self.num_items)
      s = jnp.einsum("nd,vd->nv", h.astype(ctx.dtype), w.astype(ctx.dtype),
                     preferred_element_type=jnp.float32)
      s = jnp.where(valid[None], s, NEG)
      col = jnp.where(drop, exclude - start - lo, tile)    # out of range -> dropped
      col = jnp.where((col >= 0) & (col < tile), col, tile)
      s = s.at[jnp.arange(h.shape[0])[:, None], col].set(NEG, mode="drop")
      return ids, s

    return scores_of, -(-rows // tile)

  def target_rank(self, h: jax.Array, target: jax.Array, exclude: jax.Array,
                  ctx: Context, normalize: bool = False) -> jax.Array:
    """0-based rank of `target` among all items for rows of h [N, D].

    Items in `exclude` [N, H] (the user's history; 0 = none) are removed unless they
    are the target. Ties count against the target, so a constant scorer ranks last.
    """
    table, _, _ = self._local(ctx)
    scores_of, n_tiles = self._tiles(h, exclude, exclude == target[:, None], ctx, normalize)
    vary = varying_axes(h) | varying_axes(table) | varying_axes(target)

    # Pass 1: the target's score, read from the same tile matmuls pass 2 compares
    # against (a separately computed dot may differ in the last bit).
    def target_score(best, k):
      ids, s = scores_of(k)
      hit = ids[None] == target[:, None]
      return jnp.maximum(best, jnp.where(hit, s, NEG).max(-1)), None

    t_score, _ = lax.scan(target_score, make_varying(jnp.full(h.shape[:1], NEG), vary),
                          jnp.arange(n_tiles))
    t_score = tensor.all_max(t_score, ctx.tensor_axis)

    def count(acc, k):
      ids, s = scores_of(k)
      greater = (s > t_score[:, None]).sum(-1)
      ties = ((s == t_score[:, None]) & (ids[None] != target[:, None])).sum(-1)
      return acc + greater + ties, None

    zero = make_varying(jnp.zeros(h.shape[:1], jnp.int32), vary)
    local_count, _ = lax.scan(count, zero, jnp.arange(n_tiles))
    return tensor.all_reduce(local_count, ctx.tensor_axis)

  def top_k(self, h: jax.Array, k: int, exclude: jax.Array, ctx: Context,
            normalize: bool = False):
    """Top-k item ids and scores over the whole catalogue: a running top-k over this
    shard's tiles, then an all-gather of k candidates per shard and a final top-k."""
    scores_of, n_tiles = self._tiles(h, exclude, jnp.zeros(exclude.shape, bool), ctx,
                                     normalize)
    table, _, _ = self._local(ctx)
    k_local = min(k, table.shape[0])

    def merge(best, t):
      vals, ids = best
      tile_ids, s = scores_of(t)
      v, pos = lax.top_k(s, min(k_local, s.shape[-1]))
      vals, at = lax.top_k(jnp.concatenate([vals, v], -1), k_local)
      ids = jnp.take_along_axis(jnp.concatenate([ids, tile_ids[pos]], -1), at, -1)
      return (vals, ids), None

    vary = varying_axes(h) | varying_axes(table)
    init = make_varying((jnp.full((h.shape[0], k_local), NEG, jnp.float32),
                         jnp.zeros((h.shape[0], k_local), jnp.int32)), vary)
    (vals, ids), _ = lax.scan(merge, init, jnp.arange(n_tiles))
    if ctx.tensor_axis is not None:
      vals = lax.all_gather(vals, ctx.tensor_axis, axis=1, tiled=True, to="invarying")
      ids = lax.all_gather(ids, ctx.tensor_axis, axis=1, tiled=True, to="invarying")
    vals, pos = lax.top_k(vals, min(k, vals.shape[-1]))
    return jnp.take_along_axis(ids, pos, -1), vals
