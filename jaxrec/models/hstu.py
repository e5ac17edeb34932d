"""The HSTU block (Zhai et al. 2024, "Actions Speak Louder than Words"), as published in
generative-recommenders (research/modeling/sequential/hstu.py):

  n = LayerNorm(x)                                  (no affine)
  u, v, q, k = SiLU(n @ W_uvqk)                     (one fused projection, no bias)
  a[i, j] = SiLU(q_i . k_j + rab[i, j]) / N  for j <= i in i's segment, else 0
                                                    (pointwise: no softmax, N = max_len)
  y = x + W_o(dropout(u * LayerNorm(a @ v))) + b_o
  rab[i, j] = w_pos[j - i] + w_time[bucket(t_query(i) - t_j)]
              bucket(dt) = floor(ln(max(|dt|, 1)) / 0.301), clamped to [0, buckets]

Tensor parallelism is over heads, as the SASRec block: the fused projection is
column-parallel (each device computes its heads' u, v, q, k), the output projection
row-parallel (one all-reduce). The LayerNorm over all heads' attention outputs
needs their mean and variance: two [B, T] all-reduces of partial sums.
The relative bias is shared by the heads of a layer (replicated, tiny). Query times
are the times of the items being predicted (the "request" time, as in the paper's
retrieval setting); without timestamps only the position part is used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from jaxrec.models.layers import ATTENTION_OUT, Context, param, sharded_dropout
from jaxrec.parallel import tensor

EPS = 1e-6
TIME_BUCKET_SCALE = 0.301   # HSTU's log base: ln(dt) / 0.301


def _layer_norm(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 - x32.mean(-1, keepdims=True)
  return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + EPS)).astype(x.dtype)


def time_buckets(query_times: jax.Array, key_times: jax.Array, buckets: int) -> jax.Array:
  """[B, T, T] bucket of |t_query(i) - t_key(j)| in seconds (HSTU's log buckets)."""
  dt = jnp.abs(query_times[:, :, None].astype(jnp.float32)
               - key_times[:, None, :].astype(jnp.float32))
  b = jnp.floor(jnp.log(jnp.maximum(dt, 1.0)) / TIME_BUCKET_SCALE).astype(jnp.int32)
  return jnp.clip(b, 0, buckets)


def symmetric_uniform(limit: float):
  """An initializer drawing from U(-limit, limit)."""
  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class HSTUBlock(nnx.Module):
  def __init__(self, d_model: int, n_heads: int, qk_dim: int, v_dim: int, max_len: int,
               time_buckets: int, init_std: float, rngs: nnx.Rngs):
    self.max_len = max_len
    self.qk_dim, self.v_dim = qk_dim, v_dim
    self.time_buckets = time_buckets
    width = 2 * v_dim + 2 * qk_dim
    self.uvqk = param(nnx.initializers.normal(init_std), rngs.params(),
                      (d_model, n_heads, width), ("embed", "heads", None))
    # The reference's output Linear: weight xavier uniform, bias PyTorch's Linear default
    # U(+-1/sqrt(fan_in)). (flax's `uniform(s)` draws from [0, s): all-positive, not these.)
    self.out = param(nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                     rngs.params(), (n_heads, v_dim, d_model), ("heads", "kv", "embed"))
    self.out_bias = param(symmetric_uniform(1.0 / math.sqrt(n_heads * v_dim)), rngs.params(),
                          (d_model,), ("embed",))
    self.pos_bias = param(nnx.initializers.normal(init_std), rngs.params(),
                          (2 * max_len - 1,), (None,))
    self.time_bias = param(nnx.initializers.normal(init_std), rngs.params(),
                           (time_buckets + 1,), (None,))

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, ctx: Context,
               layer_id: jax.Array | int, times: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array:
    out_w = self.out[...]
    h = tensor.column_parallel(_layer_norm(x), self.uvqk[...], "btd,dhe->bthe")
    h = jax.nn.silu(h)
    dv, dq = self.v_dim, self.qk_dim
    u, v = h[..., :dv], h[..., dv:2 * dv]
    q, k = h[..., 2 * dv:2 * dv + dq], h[..., 2 * dv + dq:]
    # relative bias: one weight per position distance (+ per time bucket)
    rel = positions[:, None, :] - positions[:, :, None] + (self.max_len - 1)
    bias = jnp.take(self.pos_bias[...], jnp.clip(rel, 0, 2 * self.max_len - 2))
    if times is not None:
      query_times, key_times = times
      bias = bias + jnp.take(self.time_bias[...],
                             time_buckets(query_times, key_times, self.time_buckets))
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jax.nn.silu(scores + bias[:, None].astype(jnp.float32)) / self.max_len
    scores = jnp.where(mask[:, None], scores, 0.0).astype(x.dtype)
    a = jnp.einsum("bhqk,bkhe->bqhe", scores, v)                  # [B, T, H_local, dv]
    # LayerNorm over every head's output: local partial sums, one all-reduce each
    a32 = a.astype(jnp.float32)
    width = a.shape[-2] * a.shape[-1] * tensor.axis_size(ctx.tensor_axis)
    mean = tensor.all_reduce(a32.sum((-2, -1)), ctx.tensor_axis) / width
    centred = a32 - mean[..., None, None]
    var = tensor.all_reduce((centred * centred).sum((-2, -1)), ctx.tensor_axis) / width
    normed = (centred * jax.lax.rsqrt(var + EPS)[..., None, None]).astype(x.dtype)
    gated = checkpoint_name(u * normed, ATTENTION_OUT)
    gated = sharded_dropout(gated, ctx, 2 * (layer_id + 1), axis=2)
    y = tensor.row_parallel(gated, out_w, "bqhe,hed->bqd", ctx.tensor_axis)
    return x + y + self.out_bias[...].astype(x.dtype)
