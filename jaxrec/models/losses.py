"""Item losses at catalogue scale: a tiled full softmax and a sampled softmax.

Both score only real targets: `compact` moves the non-padding target positions of a
batch to the front of a fixed-size buffer (static shape, nothing dropped), and the
losses walk it in chunks of `token_chunk` tokens, skipping chunks that hold no real
target, so their cost follows the real targets, not batch x max_len.

Full softmax (MaxText's vocabulary tiling, for an item catalogue): per chunk, one
pass over tiles of this device's rows of the item table with an online
log-sum-exp that also accumulates the softmax-weighted sum of item rows — so the
loss *and* its gradient w.r.t. the hidden states come out of the forward pass —
then one max and two sum all-reduces over the vocab-parallel axes. The table's
gradient is a second pass (`full_softmax_table_grad`) from the saved
log-sum-exps. No more than one [chunk, tile] block of logits is ever alive, and the
pipeline can run the two passes at different times (the second once per step).

Sampled softmax (HSTU and the in-batch recipes): the target against a shared set of
candidate negatives — uniform over the catalogue (drawn once per step from the
step's key: the same on every mesh), the batch's own targets (optionally gathered
over the data axes), or both — with logQ correction, accidental-hit masking,
optional L2-normalised embeddings and a temperature.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jaxrec.parallel import tensor, vma
from jaxrec.parallel.vma import make_varying, varying_axes

NEG = -1e30
# Name scope of the chunk loop's skip conditional (HLO accounting: its weights are
# the share of chunks holding real targets).
CHUNK_SCOPE = "item_loss_chunk"
BLOCK_BYTES = 4 * 2 ** 20   # the auto tile keeps one fp32 [chunk, tile] block under this


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The item loss (`config.loss`)."""
  type: str = "full"
  item_tile: int = 0            # items per tile of the full softmax; 0 = auto
  token_chunk: int = 1024       # real tokens scored per chunk
  negatives: str = "uniform"    # sampled: uniform | in_batch | mixed
  num_negatives: int = 128      # sampled: uniform negatives per token (or per step)
  shared_negatives: bool = False  # True: one set of uniform negatives for the whole step
  in_batch_global: bool = True  # in-batch negatives gathered over the data axes
  logq_correction: bool = True  # subtract log(expected count) of each candidate
  mask_history: bool = False    # also mask negatives found in the row's own items
  l2_norm: bool = False         # L2-normalise hidden states and item rows (sampled)
  temperature: float = 1.0      # logits / temperature (sampled)

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict | None) -> "LossConfig":
    if loss is None:
      return cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: loss[k] for k in fields if k in loss})

  def tile(self, local_rows: int) -> int:
    """Items per tile for a shard of `local_rows` rows."""
    if self.item_tile > 0:
      return min(self.item_tile, local_rows)
    return max(1, min(local_rows, BLOCK_BYTES // (4 * self.token_chunk)))


# ---------------------------------------------------------------------------
# Real tokens first.
# ---------------------------------------------------------------------------
def compact(targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, count): `targets[order]` has the real (> 0) targets first, in their
  original order, then the padding; `count` real ones. Static shape, O(N)."""
  real = targets > 0
  count = real.sum().astype(jnp.int32)
  dest = jnp.where(real, jnp.cumsum(real) - 1, count + jnp.cumsum(~real) - 1)
  order = jnp.zeros_like(dest).at[dest].set(jnp.arange(targets.shape[0], dtype=dest.dtype))
  return order, count


def chunk_size(n: int, chunk: int) -> int:
  """Tokens per chunk for n tokens and at most `chunk` per chunk: the fewest chunks,
  evened out (1600 tokens at most 1024 -> 2 x 800, not 1024 + 576 padded to 1024)."""
  pieces = -(-n // chunk)
  return -(-n // pieces)


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
  """[N, ...] -> [n, chunk, ...] zero-padded."""
  n = -(-x.shape[0] // chunk)
  pad = n * chunk - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(n, chunk, *x.shape[1:])


def _unchunked(x: jax.Array, n: int) -> jax.Array:
  return x.reshape(-1, *x.shape[2:])[:n]


def _over_chunks(fn, targets: jax.Array, chunk: int, xs: tuple, remat: bool = False) -> Any:
  """Maps fn over [chunk]-sized pieces of xs ([N, ...] each), skipping the pieces whose
  `targets` are all padding (their outputs are zeros); returns fn's outputs re-joined
  to [N, ...]. The skip is decided per device, so collectives inside fn must span
  only devices that hold the same targets (the vocab-parallel axes).

  `remat`: differentiate through the chunks keeping only their inputs. The checkpoint
  wraps the skip conditional too: a closed-over array (the item table) that passed
  through the conditional would otherwise come out of it as a residual, and the scan
  would stack one table-sized copy per chunk for the backward."""
  n = xs[0].shape[0]
  chunk = chunk_size(n, chunk)
  pieces = [_chunked(x, chunk) for x in xs]
  live = _chunked(targets, chunk).max(-1) > 0
  shapes = jax.eval_shape(fn, *[p[0] for p in pieces])

  def skip(*piece):
    del piece
    return jax.tree.map(vma.zeros, shapes)

  def run(on, *piece):
    with jax.named_scope(CHUNK_SCOPE):
      return lax.cond(on, fn, skip, *piece)

  if remat:
    run = jax.checkpoint(run)

  def body(_, args):
    return None, run(*args)

  _, out = lax.scan(body, None, (live, *pieces))
  return jax.tree.map(lambda o: _unchunked(o, n), out)


# ---------------------------------------------------------------------------
# Tiled full softmax.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FullSoftmax:
  """Static settings of one full-softmax call: the shard's rows are global ids
  start .. start + rows - 1 (start from `axes`), ids 1..num_items are items."""
  num_items: int
  axes: Any          # vocab-parallel mesh axes (None, a name or a tuple of names)
  tile: int
  chunk: int
  # vocab-parallel axes the gradient w.r.t. h is left unsummed over: the tokens'
  # owners reduce-scatter it (`gathered_full_softmax`), half an all-reduce's bytes
  partial_over: tuple[str, ...] = ()

  @property
  def grad_axes(self) -> tuple[str, ...] | None:
    axes = () if self.axes is None else (self.axes,) if isinstance(self.axes, str) \
        else tuple(self.axes)
    return tuple(a for a in axes if a not in self.partial_over) or None


def _tiles(rows: int, tile: int) -> int:
  """Tiles over a shard: tile k covers rows [lo, lo + tile), lo = min(k * tile,
  rows - tile), so a last partial tile overlaps its predecessor; the rows below
  k * tile it re-reads are masked (no divisibility needed)."""
  return -(-rows // tile)


def _tile_logits(h, table, k, start, spec: FullSoftmax):
  rows = table.shape[0]
  lo = jnp.minimum(k * spec.tile, rows - spec.tile)
  w = lax.dynamic_slice_in_dim(table, lo, spec.tile, 0)
  local = lo + jnp.arange(spec.tile)
  ids = start + local
  valid = (local >= k * spec.tile) & (ids >= 1) & (ids <= spec.num_items)
  logits = jnp.einsum("nd,vd->nv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  return lo, w, valid, logits


def _target_rows(h, targets, table, start):
  """This shard's rows of the targets [N, D] (zero where another shard holds them)."""
  local = targets - start
  inside = (targets > 0) & (local >= 0) & (local < table.shape[0])
  rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
  return jnp.where(inside[:, None], rows, 0).astype(jnp.float32), local, inside


def _chunk_stats(h, targets, table, spec: FullSoftmax):
  """(per-token CE, its gradient w.r.t. h, log-sum-exp) of one chunk."""
  start = tensor.shard_offset(table.shape[0], spec.axes)
  n = h.shape[0]

  def tile(carry, k):
    m, s, a = carry
    _, w, valid, logits = _tile_logits(h, table, k, start, spec)
    m_new = jnp.maximum(m, jnp.where(valid[None], logits, NEG).max(-1))
    scale = jnp.exp(m - m_new)
    p = jnp.where(valid[None], jnp.exp(logits - m_new[:, None]), 0.0)
    s = s * scale + p.sum(-1)
    a = a * scale[:, None] + jnp.einsum("nv,vd->nd", p, w.astype(jnp.float32))
    return (m_new, s, a), None

  vary = varying_axes(h) | varying_axes(table)
  init = make_varying((jnp.full((n,), NEG, jnp.float32), jnp.zeros((n,), jnp.float32),
                       jnp.zeros(h.shape, jnp.float32)), vary)
  (m, s, a), _ = lax.scan(tile, init, jnp.arange(_tiles(table.shape[0], spec.tile)))
  big = tensor.all_max(m, spec.axes)
  f = jnp.exp(m - big)
  w_t, _, _ = _target_rows(h, targets, table, start)
  target_logit = (h.astype(jnp.float32) * w_t).sum(-1)
  total, t_logit = tensor.all_reduce(jnp.stack([s * f, target_logit]), spec.axes)
  lse = jnp.log(total) + big
  d_h = tensor.all_reduce(a * (f / total)[:, None] - w_t, spec.grad_axes)
  real = targets > 0
  return jnp.where(real, lse - t_logit, 0.0), jnp.where(real[:, None], d_h, 0.0), lse


def full_softmax_forward(h: jax.Array, targets: jax.Array, table: jax.Array,
                         spec: FullSoftmax) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(per-token CE [N], its gradient w.r.t. h [N, D], log-sum-exp [N]) of the real
  targets (0 where the target is padding), against the whole catalogue."""
  return _over_chunks(lambda hc, tc: _chunk_stats(hc, tc, table, spec), targets, spec.chunk,
                      (h, targets))


def full_softmax_table_grad(h: jax.Array, targets: jax.Array, lse: jax.Array, g: jax.Array,
                            table: jax.Array, spec: FullSoftmax) -> jax.Array:
  """The gradient of sum_n g[n] * CE[n] w.r.t. this shard's rows of the table, from
  the log-sum-exps of the forward pass (no collectives)."""
  start = tensor.shard_offset(table.shape[0], spec.axes)
  chunk = chunk_size(h.shape[0], spec.chunk)
  hg = _chunked(h, chunk)
  tg = _chunked(targets, chunk)
  lg = _chunked(lse, chunk)
  gg = _chunked(g.astype(jnp.float32), chunk)
  vary = varying_axes(h) | varying_axes(table) | varying_axes(g)

  live = tg.max(-1) > 0

  def tile(acc, k):
    def chunk(dw, args):
      on, hc, tc, lc, gc = args

      def work(dw):
        lo, _, valid, logits = _tile_logits(hc, table, k, start, spec)
        p = jnp.where(valid[None] & (tc > 0)[:, None], jnp.exp(logits - lc[:, None]), 0.0)
        return dw + jnp.einsum("nv,nd->vd", p * gc[:, None], hc.astype(jnp.float32))

      with jax.named_scope(CHUNK_SCOPE):
        return lax.cond(on, work, lambda dw: dw, dw), None

    zero = make_varying(jnp.zeros((spec.tile, table.shape[1]), jnp.float32), vary)
    dw, _ = lax.scan(chunk, zero, (live, hg, tg, lg, gg))
    lo = jnp.minimum(k * spec.tile, table.shape[0] - spec.tile)
    acc = lax.dynamic_update_slice_in_dim(
        acc, lax.dynamic_slice_in_dim(acc, lo, spec.tile, 0) + dw, lo, 0)
    return acc, None

  acc = make_varying(jnp.zeros(table.shape, jnp.float32), vary)
  acc, _ = lax.scan(tile, acc, jnp.arange(_tiles(table.shape[0], spec.tile)))
  _, local, inside = _target_rows(h, targets, table, start)
  rows = jnp.where(inside, local, table.shape[0])   # out of range -> dropped
  return acc.at[rows].add(-g.astype(jnp.float32)[:, None] * h.astype(jnp.float32), mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def full_softmax(h: jax.Array, targets: jax.Array, table: jax.Array,
                 spec: FullSoftmax) -> jax.Array:
  """Per-token CE [N] (targets 0 score 0), differentiable w.r.t. h and the table with
  the two passes above."""
  return full_softmax_forward(h, targets, table, spec)[0]


def _full_fwd(h, targets, table, spec):
  loss, d_h, lse = full_softmax_forward(h, targets, table, spec)
  return loss, (h, targets, table, d_h, lse)


def _full_bwd(spec, res, g):
  h, targets, table, d_h, lse = res
  d_table = full_softmax_table_grad(h, targets, lse, g, table, spec)
  d_h = (g[:, None] * d_h).astype(h.dtype)
  return (make_varying(d_h, varying_axes(h)), None,
          make_varying(d_table.astype(table.dtype), varying_axes(table)))


full_softmax.defvjp(_full_fwd, _full_bwd)


def gathered_full_softmax_forward(h: jax.Array, targets: jax.Array, table: jax.Array,
                                  spec: FullSoftmax, token_axes: tuple[str, ...]):
  """The full softmax of a table whose rows are split over data axes (`token_axes`):
  every shard scores every data replica's tokens, so h [N, D] and targets [N] are
  all-gathered there first. Returns (this device's per-token CE [N], the gathered
  tokens' gradient w.r.t. h *partial over token_axes* [N x data, D], log-sum-exp,
  gathered h, gathered targets). The partial gradient is reduce-scattered to the
  tokens' owners, not all-reduced: each device needs only its own tokens'."""
  spec = dataclasses.replace(spec, partial_over=tuple(token_axes))
  h_all, t_all = (lax.all_gather(x, token_axes, tiled=True, to="invarying")
                  for x in (h, targets))
  loss, d_h, lse = full_softmax_forward(h_all, t_all, table, spec)
  start = tensor.axis_index(token_axes) * h.shape[0]
  return lax.dynamic_slice_in_dim(loss, start, h.shape[0], 0), d_h, lse, h_all, t_all


def own_tokens_grad(d_h: jax.Array, token_axes: tuple[str, ...]) -> jax.Array:
  """The gathered tokens' partial gradient [N x data, D] -> this device's tokens' [N, D]."""
  return lax.psum_scatter(d_h, token_axes, scatter_dimension=0, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gathered_full_softmax(h: jax.Array, targets: jax.Array, table: jax.Array,
                          spec: FullSoftmax, token_axes: tuple[str, ...]) -> jax.Array:
  """Per-token CE [N] of this device's tokens against a table split over data axes
  (and tensor), differentiable w.r.t. h and the table."""
  return gathered_full_softmax_forward(h, targets, table, spec, token_axes)[0]


def _gathered_fwd(h, targets, table, spec, token_axes):
  loss, d_h, lse, h_all, t_all = gathered_full_softmax_forward(h, targets, table, spec,
                                                               token_axes)
  return loss, (h, table, d_h, lse, h_all, t_all)


def _gathered_bwd(spec, token_axes, res, g):
  h, table, d_h, lse, h_all, t_all = res
  g_all = lax.all_gather(g.astype(jnp.float32), token_axes, tiled=True, to="invarying")
  d_table = full_softmax_table_grad(h_all, t_all, lse, g_all, table, spec)
  d_own = own_tokens_grad(g_all[:, None] * d_h, token_axes)
  return (make_varying(d_own.astype(h.dtype), varying_axes(h)), None,
          make_varying(d_table.astype(table.dtype), varying_axes(table)))


gathered_full_softmax.defvjp(_gathered_fwd, _gathered_bwd)


# ---------------------------------------------------------------------------
# Sampled softmax.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Candidates:
  """Negatives every token is scored against: ids [K] (0 = none) and their rows [K, D]."""
  ids: jax.Array
  rows: jax.Array


def uniform_negatives(key: jax.Array, num: int, num_items: int) -> jax.Array:
  """`num` item ids drawn uniformly from 1..num_items (with replacement)."""
  return jax.random.randint(key, (num,), 1, num_items + 1, dtype=jnp.int32)


@dataclasses.dataclass
class Negatives:
  """What each token is scored against besides its target.

  shared: candidates every token sees (the batch's targets, or uniform draws shared
    by the whole step), or None.
  draw: token keys [C, 2] -> (ids [C, K], rows [C, K, D]): K uniform negatives drawn
    for each token from its own key (HSTU's recipe), or None.
  log_q: ids -> log of their expected count among a token's candidates (logQ).
  hits: (token positions [C], candidate ids [C, K] or [K]) -> [C, K] True where a
    candidate is in the token's own sequence (masked), or None.
  """
  shared: Candidates | None = None
  draw: Any = None
  log_q: Any = None
  hits: Any = None


def sampled_softmax(h: jax.Array, targets: jax.Array, target_rows: jax.Array,
                    token_keys: jax.Array, positions: jax.Array, negatives: Negatives,
                    cfg: LossConfig) -> jax.Array:
  """Per-token sampled-softmax CE [N] (0 where the target is padding).

  target_rows [N, D]: the targets' item rows; token_keys [N, 2]: raw PRNG key data
  per token (for per-token draws); positions [N]: each token's flat position in its
  batch (for history masking). A candidate equal to the target is always masked.
  """
  hn = h.astype(jnp.float32)
  pos = target_rows.astype(jnp.float32)
  shared = negatives.shared
  inv_t = 1.0 / cfg.temperature
  norm = _l2 if cfg.l2_norm else (lambda x: x)
  hn, pos = norm(hn), norm(pos)
  shared_rows = None if shared is None else norm(shared.rows.astype(jnp.float32))

  def chunk(hc, tc, pc, kc, posc):
    pos_logit = (hc * pc).sum(-1) * inv_t
    if cfg.logq_correction and negatives.log_q is not None:
      pos_logit = pos_logit - negatives.log_q(tc)
    parts = [pos_logit[:, None]]
    if shared is not None:
      logit = jnp.einsum("nd,kd->nk", hc, shared_rows) * inv_t
      if cfg.logq_correction and negatives.log_q is not None:
        logit = logit - negatives.log_q(shared.ids)[None]
      parts.append(jnp.where(_keep(shared.ids, tc, posc, negatives), logit, NEG))
    if negatives.draw is not None:
      ids, rows = negatives.draw(kc)
      logit = jnp.einsum("nd,nkd->nk", hc, norm(rows.astype(jnp.float32))) * inv_t
      if cfg.logq_correction and negatives.log_q is not None:
        logit = logit - negatives.log_q(ids)
      parts.append(jnp.where(_keep(ids, tc, posc, negatives), logit, NEG))
    logits = jnp.concatenate(parts, axis=1)
    loss = jax.nn.logsumexp(logits, axis=-1) - pos_logit
    return jnp.where(tc > 0, loss, 0.0)

  # remat: no [chunk, K] logits or rows kept for the backward
  return _over_chunks(chunk, targets, cfg.token_chunk, (hn, targets, pos, token_keys,
                                                        positions), remat=True)


def _keep(ids: jax.Array, targets: jax.Array, positions: jax.Array,
          negatives: Negatives) -> jax.Array:
  """[C, K]: a real candidate that is neither the token's target nor (optionally) in
  its own sequence."""
  keep = (ids > 0) & (ids != targets[:, None])
  if negatives.hits is not None:
    keep &= ~negatives.hits(positions, ids)
  return keep


def in_batch_log_q(batch_ids: jax.Array, uniform_per_token: int, num_items: int):
  """ids -> log expected count among a token's candidates: K uniform draws give
  K / num_items each; the in-batch candidates hold an item as often as it occurs
  in the batch (popularity-proportional sampling)."""
  sorted_ids = None if batch_ids is None else jnp.sort(batch_ids)

  def log_q(ids):
    q = jnp.full(ids.shape, uniform_per_token / num_items, jnp.float32)
    if sorted_ids is not None:
      counts = (jnp.searchsorted(sorted_ids, ids, side="right")
                - jnp.searchsorted(sorted_ids, ids, side="left")).astype(jnp.float32)
      q = q + jnp.where(ids > 0, counts, 0.0)
    return jnp.log(jnp.maximum(q, 1e-30))

  return log_q


def _l2(x: jax.Array) -> jax.Array:
  return x * lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def history_hits(tokens: dict[str, jax.Array], num_items: int):
  """(positions [C], candidate ids [C, K] or [K]) -> [C, K]: the candidate is among
  the items of the token's own sequence (its row's segment; a position is the
  token's flat [B * T] index in `tokens`)."""
  items = tokens["inputs"]
  seg = tokens.get("segments", (items > 0).astype(jnp.int32))
  t = items.shape[1]
  keys = jnp.where(items > 0, seg * (num_items + 1) + items, -1)
  sorted_keys = jnp.sort(keys, axis=-1)

  def member(position, cand):
    r, c = position // t, position % t
    wanted = seg[r, c] * (num_items + 1) + cand
    at = jnp.clip(jnp.searchsorted(sorted_keys[r], wanted), 0, t - 1)
    return (sorted_keys[r][at] == wanted) & (cand > 0)

  def hits(positions, ids):
    if ids.ndim == 1:
      return jax.vmap(lambda p: member(p, ids))(positions)
    return jax.vmap(member)(positions, ids)

  return hits
