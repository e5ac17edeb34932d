"""Transformer pieces (norm, attention, MLP, block) as Flax nnx modules.

Parameters are created at their *global* shapes with logical axis names; inside
the train step's shard_map the same modules run on local shards (fewer heads,
a slice of the MLP width), so nothing here hard-codes a sharded size. The tensor
axis name arrives with each call in `Context`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrec.parallel import tensor

# checkpoint_name of each attention block's output (the `save_attention_out` policy)
ATTENTION_OUT = "attention_out"


@dataclasses.dataclass(frozen=True)
class Context:
  """Per-call settings: which axes to reduce over, dropout keys, compute dtype."""
  tensor_axis: str | tuple[str, ...] | None = None   # the vocab-/tensor-parallel axes
  dropout_rate: float = 0.0
  row_keys: jax.Array | None = None   # one PRNG key per example row; None = no dropout
  dtype: jnp.dtype = jnp.float32
  loss_key: jax.Array | None = None   # the step's key for sampled negatives (same everywhere)
  attention: str | None = "xla"       # jax.nn.dot_product_attention implementation
  batch_axes: tuple[str, ...] = ()    # the data axes (in-batch negatives gather over them)
  table_axes: str | tuple[str, ...] | None = None   # the item table's rows' axes (None: tensor_axis)
  row_gradients: str = "exact"        # rows sharding: how row gradients travel (exact|bf16|int8)
  dropout_placement: str = "residual"  # SASRec block: residual | reference (Block says where)

  @property
  def item_axes(self) -> tuple[str, ...]:
    """The axes the item table's rows are split over (vocab-parallel reductions)."""
    axes = self.tensor_axis if self.table_axes is None else self.table_axes
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

  @property
  def token_axes(self) -> tuple[str, ...]:
    """Item axes the tokens differ over (rows sharding): tokens meet the table there
    by all-gathers."""
    return tuple(a for a in self.item_axes if a in self.batch_axes)

  @property
  def train(self) -> bool:
    return self.row_keys is not None and self.dropout_rate > 0.0


def param(init, key, shape, axes, dtype=jnp.float32) -> nnx.Param:
  return nnx.Param(init(key, shape, dtype), out_sharding=axes, eager_sharding=False)


def dropout(x: jax.Array, ctx: Context, site: int | jax.Array) -> jax.Array:
  """Dropout whose mask depends only on (example row, site), never on the mesh.

  Keys are per example row, so a row gets the same mask whichever device holds it,
  and every tensor-parallel rank (which holds the same replicated activation)
  draws the same mask.
  """
  if not ctx.train:
    return x
  keep = 1.0 - ctx.dropout_rate

  def row_mask(key):
    return jax.random.bernoulli(jax.random.fold_in(key, site), keep, x.shape[1:])

  mask = jax.vmap(row_mask)(ctx.row_keys)
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def sharded_dropout(x: jax.Array, ctx: Context, site: int | jax.Array, axis: int) -> jax.Array:
  """`dropout` of an activation whose `axis` (heads, MLP width) is split over the tensor
  axis: each row's mask is drawn for the whole axis and this device takes its slice, so
  every mesh drops the same entries."""
  if not ctx.train:
    return x
  keep = 1.0 - ctx.dropout_rate
  full = list(x.shape[1:])
  full[axis - 1] *= tensor.axis_size(ctx.tensor_axis)
  start = tensor.axis_index(ctx.tensor_axis) * x.shape[axis]

  def row_mask(key):
    mask = jax.random.bernoulli(jax.random.fold_in(key, site), keep, tuple(full))
    return jax.lax.dynamic_slice_in_dim(mask, start, x.shape[axis], axis - 1)

  mask = jax.vmap(row_mask)(ctx.row_keys)
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


# Dropout sites past the residual ones (0: embeddings, 2l+2 / 2l+3: layer l), for the
# `reference` placement's attention probabilities and MLP hidden activations.
PROBS_SITE, MLP_HIDDEN_SITE = 1 << 20, 2 << 20


class Norm(nnx.Module):
  def __init__(self, dim: int, kind: str):
    self.kind = kind
    self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=("embed",), eager_sharding=False)
    if kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((dim,)), out_sharding=("embed",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - x32.mean(-1, keepdims=True)
      y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6)
      y = y * self.scale[...] + self.bias[...]
    else:
      y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-6) * self.scale[...]
    return y.astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding on the last dim of x [B, T, H, Dh]."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[..., None].astype(jnp.float32) * freq          # [B?, T, half]
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention; heads column-parallel, output projection row-parallel."""

  def __init__(self, d_model: int, n_heads: int, rotary_positions: bool, init_std: float,
               rngs: nnx.Rngs):
    head_dim = d_model // n_heads
    init = nnx.initializers.normal(init_std)
    self.rotary_positions = rotary_positions
    self.qkv = param(init, rngs.params(), (d_model, 3, n_heads, head_dim),
                     ("embed", None, "heads", "kv"))
    self.out = param(nnx.initializers.normal(init_std / math.sqrt(2.0)), rngs.params(),
                     (n_heads, head_dim, d_model), ("heads", "kv", "embed"))

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array,
               ctx: Context, kv: jax.Array | None = None,
               probs_site: int | jax.Array | None = None) -> jax.Array:
    """Queries from x; keys and values from `kv` when given (else from x). With a
    `probs_site` and dropout on, the attention probabilities are dropped there."""
    if kv is None:
      qkv = tensor.column_parallel(x, self.qkv[...], "btd,dkhe->btkhe")
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = tensor.column_parallel(x, self.qkv[:, 0], "btd,dhe->bthe")
      kv = tensor.column_parallel(kv, self.qkv[:, 1:], "btd,dkhe->btkhe")
      k, v = kv[:, :, 0], kv[:, :, 1]
    if self.rotary_positions:
      q, k = rotary(q, positions), rotary(k, positions)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if probs_site is not None and ctx.train:
      # written out: jax.nn.dot_product_attention has no dropout
      s = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(jnp.where(mask[:, None], s * scale, -1e30), -1)
      probs = sharded_dropout(probs.astype(v.dtype), ctx, probs_site, axis=1)
      o = jnp.einsum("bhqk,bkhe->bqhe", probs, v)
    else:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation=ctx.attention)
    out = tensor.row_parallel(o, self.out[...], "bqhe,hed->bqd", ctx.tensor_axis)
    return checkpoint_name(out, ATTENTION_OUT)


class MLP(nnx.Module):
  """Column-parallel up-projection, row-parallel down-projection."""

  def __init__(self, d_model: int, d_ff: int, kind: str, init_std: float, rngs: nnx.Rngs):
    self.kind = kind
    init = nnx.initializers.normal(init_std)
    if kind == "swiglu":
      self.w_in = param(init, rngs.params(), (d_model, 2, d_ff), ("embed", None, "mlp"))
    else:
      self.w_in = param(init, rngs.params(), (d_model, d_ff), ("embed", "mlp"))
    self.w_out = param(nnx.initializers.normal(init_std / math.sqrt(2.0)), rngs.params(),
                       (d_ff, d_model), ("mlp", "embed"))

  def __call__(self, x: jax.Array, ctx: Context,
               hidden_site: int | jax.Array | None = None) -> jax.Array:
    """With a `hidden_site` and dropout on, the hidden activations are dropped there."""
    if self.kind == "swiglu":
      h = tensor.column_parallel(x, self.w_in[...], "btd,dkf->btkf")
      h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
    else:
      act = jax.nn.relu if self.kind == "relu" else jax.nn.gelu
      h = act(tensor.column_parallel(x, self.w_in[...], "btd,df->btf"))
    if hidden_site is not None:
      h = sharded_dropout(h, ctx, hidden_site, axis=2)
    return tensor.row_parallel(h, self.w_out[...], "btf,fd->btd", ctx.tensor_axis)


class Block(nnx.Module):
  """A transformer block, in one of two layouts with the same parameters.

  `pre_norm`: x + attn(n1(x)), then + mlp(n2(.)): the standard layout.
  `original`: SASRec's (Kang & McAuley 2018), kept by the HSTU paper's SASRec baseline
  (generative-recommenders `sasrec.py`): queries from q = n1(x) but keys and values
  from the un-normalised x, h = n2(q + attn), out = h + mlp(h).

  Dropout (`Context.dropout_placement`), in either layout: `residual` drops the
  attention and MLP outputs before they are added; `reference` drops where the reference
  SASRec does (torch's MultiheadAttention and its feed-forward): the attention
  probabilities, the MLP's hidden activations and the MLP output.
  """

  def __init__(self, d_model: int, n_heads: int, d_ff: int, mlp: str, norm: str,
               rotary_positions: bool, init_std: float, rngs: nnx.Rngs,
               layout: str = "pre_norm"):
    self.layout = layout
    self.norm1 = Norm(d_model, norm)
    self.attn = Attention(d_model, n_heads, rotary_positions, init_std, rngs)
    self.norm2 = Norm(d_model, norm)
    self.mlp = MLP(d_model, d_ff, mlp, init_std, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, ctx: Context,
               layer_id: jax.Array | int) -> jax.Array:
    site = 2 * (layer_id + 1)
    q_in, kv_in = self.attention_inputs(x)
    if ctx.dropout_placement == "reference":
      attn = self.attn(q_in, mask, positions, ctx, kv=kv_in, probs_site=site + PROBS_SITE)
    else:
      attn = dropout(self.attn(q_in, mask, positions, ctx, kv=kv_in), ctx, site)
    return self.after_attention(x, q_in, attn, ctx, site + 1)

  # The layout rule, in two halves around attention, so that the KV-cached serving
  # path (serve/incremental.py), which runs its own attention, shares it.
  def attention_inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(queries' input, keys' and values' input; None: the same as the queries')."""
    q_in = self.norm1(x)
    return q_in, (x if self.layout == "original" else None)

  def after_attention(self, x: jax.Array, q_in: jax.Array, attn: jax.Array, ctx: Context,
                      site: jax.Array | int) -> jax.Array:
    """The block's output from its input, the queries' input and the attention output
    (dropout applied); `site` is the MLP output dropout's."""
    hidden_site = site + MLP_HIDDEN_SITE if ctx.dropout_placement == "reference" else None
    if self.layout == "original":
      h = self.norm2(q_in + attn)
      return h + dropout(self.mlp(h, ctx, hidden_site), ctx, site)
    x = x + attn
    return x + dropout(self.mlp(self.norm2(x), ctx, hidden_site), ctx, site)
