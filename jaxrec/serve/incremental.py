"""Incremental inference: when a user's history grows by one item, one token of work.

A session keeps every layer's keys and values of the positions seen so far (a KV
cache, [layers, max_len, heads, head_dim] per user). Appending an item embeds it at
the next position, runs it through each block attending to the cache, stores its
keys and values, and scores the catalogue from its output: the same hidden state a
full recompute of the longer history gives (positions count from the first item, so
earlier keys and values stay valid). Once the history fills max_len the window
slides and every position moves: `append` then recomputes the window in full.

Written for the SASRec block (softmax attention); the HSTU block's pointwise
attention would cache the same way and is not done here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models.layers import rotary
from jaxrec.models.recommender import RecommenderFns


@dataclasses.dataclass
class Session:
  history: list[int]
  keys: jax.Array       # [L, max_len, H, Dh]
  values: jax.Array
  hidden: jax.Array     # [D] final hidden state at the last position


class Incremental:
  """KV-cached forward passes of a SASRec model on one device (params replicated)."""

  def __init__(self, fns: RecommenderFns, params: Any):
    cfg = fns.cfg
    if cfg.block != "sasrec":
      raise ValueError("incremental inference is written for the SASRec block; "
                       f"model.block = {cfg.block!r} serves with full recomputes")
    if cfg.position_origin != "start" and "pos" in params:
      raise ValueError("incremental inference needs positions counted from the first item "
                       "(model.position_origin = 'start'); this model counts from the end")
    self.fns, self.cfg = fns, cfg
    self.params = jax.device_get(params)
    self._prefill = jax.jit(self._prefill_fn)
    self._step = jax.jit(self._step_fn)

  # ------------------------------------------------------------------ public
  def start(self, history: list[int]) -> Session:
    """A session over `history` (internal ids, oldest first): a full forward that
    also fills the cache."""
    window = list(history)[-self.cfg.max_len:]
    ids = jnp.asarray(window, jnp.int32)
    keys, values, hidden = self._prefill(self.params, ids)
    return Session(list(history), keys, values, hidden)

  def append(self, session: Session, item: int) -> Session:
    """The session after one more item: one token through the stack while the window
    has room, else a full recompute of the slid window."""
    n = min(len(session.history), self.cfg.max_len)
    if n >= self.cfg.max_len:
      return self.start(session.history + [item])
    keys, values, hidden = self._step(self.params, session.keys, session.values,
                                      jnp.int32(item), jnp.int32(n))
    return Session(session.history + [item], keys, values, hidden)

  def scores(self, session: Session) -> np.ndarray:
    """Scores of every item id (index = id; padding rows at -1e30)."""
    table = self.fns.item_table(self.params)
    return np.asarray(table.local_logits(session.hidden[None], self.fns.context())[0])

  # ---------------------------------------------------------------- the math
  def _qkv(self, block, x, positions):
    """Queries, keys and values of x [T, D], plus the queries' input (for _finish)."""
    w = block.attn.qkv[...].astype(x.dtype)
    q_in, kv_in = block.attention_inputs(x)
    q = jnp.einsum("td,dhe->the", q_in, w[:, 0])
    kv = jnp.einsum("td,dkhe->tkhe", q_in if kv_in is None else kv_in, w[:, 1:])
    k, v = kv[:, 0], kv[:, 1]
    if self.cfg.positions == "rope":
      q, k = rotary(q[None], positions[None])[0], rotary(k[None], positions[None])[0]
    return q, k, v, q_in

  def _finish(self, block, x, q_in, attended):
    ctx = self.fns.context(dropout_rate=0.0)
    attn = jnp.einsum("the,hed->td", attended, block.attn.out[...].astype(x.dtype))
    return block.after_attention(x[None], q_in[None], attn[None], ctx, site=0)[0]

  def _embed(self, params, ids, positions):
    h = self.fns.lookup(params, ids, self.fns.context())
    if self.cfg.embed_scale:
      h = h * jnp.asarray(math.sqrt(self.cfg.d_model), h.dtype)
    if "pos" in params:
      h = h + params["pos"][positions].astype(h.dtype)
    return h

  def _prefill_fn(self, params, ids):
    n = ids.shape[0]
    positions = jnp.arange(n)
    x = self._embed(params, ids, positions)
    causal = positions[None, :] <= positions[:, None]
    length = self.cfg.max_len

    def layer(x, lp):
      block = self.fns.block(lp)
      q, k, v, q_in = self._qkv(block, x, positions)
      s = jnp.einsum("qhe,khe->hqk", q, k, preferred_element_type=jnp.float32)
      s = jnp.where(causal[None], s / math.sqrt(q.shape[-1]), -1e30)
      attended = jnp.einsum("hqk,khe->qhe", jax.nn.softmax(s, -1).astype(x.dtype), v)
      pad = [(0, length - n), (0, 0), (0, 0)]
      return self._finish(block, x, q_in, attended), (jnp.pad(k, pad), jnp.pad(v, pad))

    x, (keys, values) = jax.lax.scan(layer, x, params["layers"])
    return keys, values, self.fns.final_hidden(params, x[-1])

  def _step_fn(self, params, keys, values, item, n):
    position = n[None]
    x = self._embed(params, item[None], position)
    seen = jnp.arange(self.cfg.max_len) <= n

    def layer(x, args):
      lp, k_cache, v_cache = args
      block = self.fns.block(lp)
      q, k, v, q_in = self._qkv(block, x, position)
      k_cache = jax.lax.dynamic_update_index_in_dim(k_cache, k[0], n, 0)
      v_cache = jax.lax.dynamic_update_index_in_dim(v_cache, v[0], n, 0)
      s = jnp.einsum("qhe,khe->hqk", q, k_cache, preferred_element_type=jnp.float32)
      s = jnp.where(seen[None, None], s / math.sqrt(q.shape[-1]), -1e30)
      attended = jnp.einsum("hqk,khe->qhe", jax.nn.softmax(s, -1).astype(x.dtype), v_cache)
      return self._finish(block, x, q_in, attended), (k_cache, v_cache)

    x, (keys, values) = jax.lax.scan(layer, x, (params["layers"], keys, values))
    return keys, values, self.fns.final_hidden(params, x[0])
