"""The generative recommender: a decoder-only causal transformer over item ids.

SASRec with full-softmax cross-entropy ("SASRec-CE"): item embeddings (+ learned
or rotary positions) -> stacked pre-norm blocks -> final norm -> scores against
the same (tied) item table, a loss at every non-padding position.

`Recommender` is the nnx module used to create parameters (global shapes, logical
axes). `RecommenderFns` exposes its pieces as pure functions over pure-dict
params so the train step can run them on local shards inside shard_map, slice the
stacked layers into pipeline stages, and take VJPs piece by piece.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxrec.models.embedding import ItemEmbedding, padded_table_rows
from jaxrec.models.layers import Block, Context, Norm, dropout
from jaxrec.parallel import tensor
from jaxrec.parallel.vma import make_varying, tree_varying_axes
from jaxrec.partitioning import logical_axes_of

Params = dict[str, Any]
# Name scope of the cond that skips pipeline padding slots (branch 1 = a real layer).
LAYER_SLOT_SCOPE = "layer_slot"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_items: int
  max_len: int
  d_model: int = 64
  n_heads: int = 2
  n_layers: int = 2
  d_ff: int = 256
  dropout: float = 0.0
  positions: str = "learned"
  mlp: str = "gelu"
  norm: str = "layernorm"
  embed_scale: bool = True
  item_table_multiple: int = 128
  dtype: str = "float32"
  init_std: float = 0.02

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, num_items: int,
                  max_len: int) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_items", "max_len"}
    return cls(num_items=num_items, max_len=max_len,
               **{k: model[k] for k in fields if k in model})

  @property
  def table_rows(self) -> int:
    return padded_table_rows(self.num_items, self.item_table_multiple)

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


class Recommender(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.items = ItemEmbedding(cfg.num_items, cfg.d_model, cfg.item_table_multiple,
                               cfg.d_model ** -0.5 if cfg.embed_scale else cfg.init_std,
                               rngs)
    if cfg.positions == "learned":
      self.pos = nnx.Param(
          nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.max_len, cfg.d_model)),
          out_sharding=("seq", "embed"), eager_sharding=False)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs: nnx.Rngs) -> Block:
      return Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.mlp, cfg.norm,
                   cfg.positions == "rope", cfg.init_std, rngs)

    self.layers = make_layers(rngs)
    self.final_norm = Norm(cfg.d_model, cfg.norm)


class RecommenderFns:
  """Pure functions over pure-dict params (global or local shards).

  Param dict keys: `items`, `pos` (learned positions only), `layers` (every leaf
  has a leading stacked-layer axis), `final_norm`.
  """

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    abstract = nnx.eval_shape(lambda: Recommender(cfg, nnx.Rngs(0)))
    self._graphdefs = {
        "items": nnx.graphdef(abstract.items),
        "layers": nnx.graphdef(abstract.layers),
        "final_norm": nnx.graphdef(abstract.final_norm),
    }
    state = nnx.state(abstract, nnx.Param)
    self.logical_axes: Params = logical_axes_of(state)
    self.shapes: Params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                       nnx.to_pure_dict(state))

  # ----------------------------------------------------------------- creation
  def init(self, key: jax.Array) -> Params:
    """Global (unsharded) params; jit with out_shardings to create them sharded."""
    model = Recommender(self.cfg, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.shapes))

  def context(self, tensor_axis: str | None = None, row_keys: jax.Array | None = None,
              dropout_rate: float | None = None) -> Context:
    return Context(tensor_axis=tensor_axis,
                   dropout_rate=self.cfg.dropout if dropout_rate is None else dropout_rate,
                   row_keys=row_keys, dtype=self.cfg.compute_dtype)

  # ------------------------------------------------------------------- pieces
  def _items(self, params: Params) -> ItemEmbedding:
    return nnx.merge(self._graphdefs["items"], params["items"])

  def embed(self, params: Params, inputs: jax.Array, ctx: Context) -> jax.Array:
    """inputs [B, T] -> h [B, T, D] (uses params['items'] and params.get('pos'))."""
    return self.embed_rows(params, self._items(params).lookup(inputs, ctx), inputs, ctx)

  def embed_rows(self, params: Params, rows: jax.Array, inputs: jax.Array,
                 ctx: Context) -> jax.Array:
    """Looked-up item rows [B, T, D] -> h: scale, positions, dropout. Split from the
    lookup so a pipeline can back-propagate to the rows and scatter-add their
    gradient into the table's (sparse) accumulator itself."""
    h = rows
    if self.cfg.embed_scale:
      h = h * jnp.asarray(self.cfg.d_model ** 0.5, h.dtype)
    if "pos" in params:
      h = h + params["pos"][-inputs.shape[1]:].astype(h.dtype)[None]
    return dropout(h, ctx, 0)

  def scatter_item_grads(self, table_grad: jax.Array, inputs: jax.Array, d_rows: jax.Array,
                         ctx: Context) -> jax.Array:
    """table_grad (this device's shard) += the lookup's gradient, touching only the
    looked-up rows (the transpose of `ItemEmbedding.lookup`)."""
    start = tensor.shard_offset(table_grad.shape[0], ctx.tensor_axis)
    local = inputs - start
    inside = (local >= 0) & (local < table_grad.shape[0])
    rows = jnp.where(inside, local, table_grad.shape[0])
    return table_grad.at[rows].add(d_rows.astype(table_grad.dtype), mode="drop")

  def layer(self, layer_params: Params, h: jax.Array, inputs: jax.Array, ctx: Context,
            layer_id: jax.Array | int) -> jax.Array:
    """One transformer block on h; `inputs` give the padding mask and positions."""
    block = nnx.merge(self._graphdefs["layers"], layer_params)
    mask, positions = attention_mask(inputs)
    return block(h, mask, positions, ctx, layer_id)

  def layers(self, layers_params: Params, h: jax.Array, inputs: jax.Array, ctx: Context,
             layer_ids: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """Scans stacked blocks over h. `active[i]` False skips slot i (pipeline padding)."""
    # The carry varies over whatever the stacked params vary over (e.g. `pipe`),
    # except the tensor axis, which each block reduces over.
    h = make_varying(h, tree_varying_axes(layers_params) - {ctx.tensor_axis})

    def body(h, xs):
      p, lid, on = xs
      if on is None:
        return self.layer(p, h, inputs, ctx, lid), None
      with jax.named_scope(LAYER_SLOT_SCOPE):  # named for the HLO accounting
        return jax.lax.cond(on, lambda h: self.layer(p, h, inputs, ctx, lid),
                            lambda h: h, h), None

    h, _ = jax.lax.scan(body, h, (layers_params, layer_ids, active))
    return h

  def final_hidden(self, params: Params, h: jax.Array) -> jax.Array:
    return nnx.merge(self._graphdefs["final_norm"], params["final_norm"])(h)

  def head_loss(self, params: Params, h: jax.Array, targets: jax.Array,
                ctx: Context) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over non-padding targets, number of such targets) for h [B, T, D]."""
    h = self.final_hidden(params, h)
    flat_h = h.reshape(-1, h.shape[-1])
    flat_t = targets.reshape(-1)
    ce = self._items(params).cross_entropy(flat_h, flat_t, ctx)
    weight = (flat_t > 0).astype(jnp.float32)
    return (ce * weight).sum(), weight.sum()

  def last_hidden(self, params: Params, inputs: jax.Array, ctx: Context) -> jax.Array:
    """Final-normed hidden state at the last position (inputs are left-padded)."""
    h = self.embed(params, inputs, ctx)
    h = self.layers(params["layers"], h, inputs, ctx, jnp.arange(self.cfg.n_layers))
    return self.final_hidden(params, h[:, -1])

  def rank(self, params: Params, h_last: jax.Array, target: jax.Array, exclude: jax.Array,
           ctx: Context) -> jax.Array:
    return self._items(params).target_rank(h_last, target, exclude, ctx)

  def top_k(self, params: Params, h_last: jax.Array, k: int, exclude: jax.Array,
            ctx: Context):
    return self._items(params).top_k(h_last, k, exclude, ctx)

  # ------------------------------------------------------------ the reference
  def loss(self, params: Params, inputs: jax.Array, targets: jax.Array,
           ctx: Context) -> tuple[jax.Array, jax.Array]:
    """(CE sum, token count) over a batch: the single-device reference forward."""
    h = self.embed(params, inputs, ctx)
    h = self.layers(params["layers"], h, inputs, ctx, jnp.arange(self.cfg.n_layers))
    return self.head_loss(params, h, targets, ctx)

  def logits(self, params: Params, inputs: jax.Array, ctx: Context) -> jax.Array:
    """Full logits [B, T, items] (single device only; for tests and small models)."""
    h = self.embed(params, inputs, ctx)
    h = self.final_hidden(params, self.layers(params["layers"], h, inputs, ctx,
                                              jnp.arange(self.cfg.n_layers)))
    flat = h.reshape(-1, h.shape[-1])
    return self._items(params).local_logits(flat, ctx).reshape(*h.shape[:2], -1)


def attention_mask(inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal mask over non-padding keys [B, T, T], and per-token positions [B, T].

  Sequences are left-padded; a query at a padding position keeps its own key so
  its (ignored) softmax stays finite.
  """
  t = inputs.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  valid = inputs > 0
  mask = causal[None] & (valid[:, None, :] | jnp.eye(t, dtype=bool)[None])
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  return mask, positions
