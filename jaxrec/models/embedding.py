"""The item table: vocab-parallel lookup and full-catalogue ranking, tile by tile.

In a recommender the item catalogue is the big matrix. Its rows are split over the
context's item axes: tensor (the default), tensor x pipe for the spread head, or data
x tensor (`embedding.sharding = rows`: ZeRO for the table). No function here ever
materialises the whole table or a [tokens, items] score matrix on one device:
ranking and top-k walk the shard's rows in tiles (the losses in models/losses.py do
the same).

Where the rows are split over data axes too, a device's tokens are not the other
data replicas' tokens, so they meet the table in two ways:
  lookup  de-duplicate the ids, all-gather them over data, every shard fills in the
          rows it owns, a reduce-scatter over data returns each device its rows (and
          a sum over tensor). Its transpose is the sparse gradient exchange: the
          looked-up rows' gradients are all-gathered over data — (unique ids, rows),
          bytes in proportion to the ids, never a dense all-reduce of the table.
          `embedding.row_gradients` = bf16 / int8 sends those rows compressed (int8:
          one fp32 scale per row, round to nearest; no error feedback, as the lookup
          keeps no state).
  score   (losses, ranking) the hidden states are all-gathered over data, every
          shard scores them against its rows, and each device keeps its own. Row 0 is padding and rows past the catalogue are padding too (the table
is padded to a fixed multiple so its shape does not depend on the mesh); neither
can be a target or win a ranking.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.models.layers import Context
from jaxrec.parallel import tensor
from jaxrec.parallel.compression import Int8
from jaxrec.parallel.vma import make_varying, varying_axes

NEG = -1e30
RANK_TILE = 4096    # items scored per tile when ranking / taking top-k
# Name scope of the rows-sharded lookup's exchange over data (and, by transposition,
# of the sparse row-gradient exchange): the HLO accounting reports it on its own line.
TABLE_EXCHANGE_SCOPE = "table_rows_exchange"


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
    start = tensor.shard_offset(table.shape[0], ctx.item_axes)
    ids = start + jnp.arange(table.shape[0])
    valid = (ids >= 1) & (ids <= self.num_items)
    return table, start, valid

  def _owned_rows(self, ids: jax.Array, ctx: Context) -> jax.Array:
    """This shard's rows of `ids` [...] (zeros for ids another shard holds)."""
    table, start, _ = self._local(ctx)
    local = ids - start
    inside = (local >= 0) & (local < table.shape[0])
    rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
    return jnp.where(inside[..., None], rows, 0).astype(ctx.dtype)

  def lookup(self, ids: jax.Array, ctx: Context) -> jax.Array:
    """Embeds ids [...]: each shard contributes its rows, one all-reduce joins them
    (rows sharding: de-duplicated ids gathered over data, rows reduce-scattered)."""
    data = ctx.token_axes
    if not data:
      return tensor.all_reduce(self._owned_rows(ids, ctx), ctx.item_axes)
    flat = ids.reshape(-1)
    unique, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=0, return_inverse=True)
    with jax.named_scope(TABLE_EXCHANGE_SCOPE):
      wanted = lax.all_gather(unique, data, tiled=True)
      rows = _scatter_rows(self._owned_rows(wanted, ctx), data, ctx.row_gradients)
    rows = tensor.all_reduce(rows, tuple(a for a in ctx.item_axes if a not in data))
    return rows[inverse.reshape(-1)].reshape(*ids.shape, rows.shape[-1])

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
    return per_device(lambda h, t, e: self._target_rank(h, t, e, ctx, normalize), ctx,
                      h, target, exclude)

  def _target_rank(self, h: jax.Array, target: jax.Array, exclude: jax.Array,
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
    t_score = tensor.all_max(t_score, ctx.item_axes)

    def count(acc, k):
      ids, s = scores_of(k)
      greater = (s > t_score[:, None]).sum(-1)
      ties = ((s == t_score[:, None]) & (ids[None] != target[:, None])).sum(-1)
      return acc + greater + ties, None

    zero = make_varying(jnp.zeros(h.shape[:1], jnp.int32), vary)
    local_count, _ = lax.scan(count, zero, jnp.arange(n_tiles))
    return tensor.all_reduce(local_count, ctx.item_axes)

  def top_k(self, h: jax.Array, k: int, exclude: jax.Array, ctx: Context,
            normalize: bool = False):
    return per_device(lambda h, e: self._top_k(h, k, e, ctx, normalize), ctx, h, exclude)

  def _top_k(self, h: jax.Array, k: int, exclude: jax.Array, ctx: Context,
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
    if ctx.item_axes:
      vals = lax.all_gather(vals, ctx.item_axes, axis=1, tiled=True, to="invarying")
      ids = lax.all_gather(ids, ctx.item_axes, axis=1, tiled=True, to="invarying")
    vals, pos = lax.top_k(vals, min(k, vals.shape[-1]))
    return jnp.take_along_axis(ids, pos, -1), vals


def _scatter_rows(rows: jax.Array, axes: tuple[str, ...], payload: str) -> jax.Array:
  """Reduce-scatter of looked-up rows over the data axes; its transpose all-gathers
  the rows' gradients to their owners, in `payload` ("exact": as computed)."""
  if payload == "exact":
    return lax.psum_scatter(rows, axes, scatter_dimension=0, tiled=True)
  return _compressed_scatter(rows, axes, payload)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _compressed_scatter(rows, axes, payload):
  return lax.psum_scatter(rows, axes, scatter_dimension=0, tiled=True)


def _compressed_scatter_fwd(rows, axes, payload):
  return _compressed_scatter(rows, axes, payload), None


def _compressed_scatter_bwd(axes, payload, _, g):
  if payload == "bf16":   # as raw 16-bit words, or XLA moves the decoding cast first
    bits = lax.all_gather(lax.bitcast_convert_type(g.astype(jnp.bfloat16), jnp.uint16),
                          axes, tiled=True)
    return (lax.bitcast_convert_type(bits, jnp.bfloat16).astype(g.dtype),)
  codec = Int8(block=g.shape[-1], error_feedback=False)    # one scale per row
  payload = codec.encode(g.astype(jnp.float32), None)
  payload = jax.tree.map(lambda x: lax.all_gather(x, axes, tiled=True), payload)
  return (codec.decode(payload).astype(g.dtype),)


_compressed_scatter.defvjp(_compressed_scatter_fwd, _compressed_scatter_bwd)


def row_gradient_bytes(payload: str, d_model: int, act_bytes: int) -> float:
  """Bytes one looked-up row's gradient takes on the wire."""
  return {"exact": d_model * act_bytes, "bf16": d_model * 2, "int8": d_model + 4}[payload]


def per_device(fn, ctx: Context, *rows: jax.Array):
  """fn over rows [N, ...] of this device, whatever the table sharding: where the
  table's rows are split over data axes, every data replica's rows are gathered
  first (each shard must score them all) and this device keeps its own results."""
  data = ctx.token_axes
  if not data:
    return fn(*rows)
  n = rows[0].shape[0]
  gathered = [lax.all_gather(r, data, tiled=True, to="invarying") for r in rows]
  out = fn(*gathered)
  me = tensor.axis_index(data)
  return jax.tree.map(lambda o: lax.dynamic_slice_in_dim(o, me * n, n, 0), out)
