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

from jaxrec.models import losses
from jaxrec.models.embedding import ItemEmbedding, padded_table_rows
from jaxrec.models.hstu import HSTUBlock
from jaxrec.models.layers import ATTENTION_OUT, Block, Context, Norm, dropout
from jaxrec.parallel.vma import make_varying, tree_varying_axes, varying_axes
from jaxrec.partitioning import logical_axes_of

Params = dict[str, Any]
# Per-token arrays of a batch: ids [B, T], or {"inputs": ids, "segments": [B, T], ...}
Tokens = jax.Array | dict[str, jax.Array]
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
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"
  block: str = "sasrec"         # "sasrec" (softmax attention + MLP) or "hstu"
  sasrec_layout: str = "pre_norm"  # or "original" (layers.Block says how they differ)
  dropout_placement: str = "residual"  # or "reference" (layers.Block says where)
  hstu_qk_dim: int = 0          # HSTU per-head query/key width (0: d_model / n_heads)
  hstu_v_dim: int = 0           # HSTU per-head u/v width (0: d_model / n_heads)
  time_bias: bool = True        # HSTU: bucketed time-gap bias (when the data has times)
  time_buckets: int = 128
  final_norm: bool = True       # a norm after the last block (HSTU has none)
  position_origin: str = "start"  # positions count from a sequence's first item, or "end"
  init_std: float = 0.02
  item_init_std: float = 0.0      # 0: d^-1/2 with embed_scale (input std 1), else init_std
  position_init_std: float = 0.0  # 0: init_std

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

  @property
  def storage_dtype(self):
    return jnp.bfloat16 if self.param_dtype == "bfloat16" else jnp.float32

  @property
  def item_std(self) -> float:
    return self.item_init_std or (self.d_model ** -0.5 if self.embed_scale else self.init_std)

  @property
  def position_std(self) -> float:
    return self.position_init_std or self.init_std

  @property
  def qk_dim(self) -> int:
    return self.hstu_qk_dim or self.d_model // self.n_heads

  @property
  def v_dim(self) -> int:
    return self.hstu_v_dim or self.d_model // self.n_heads


class Recommender(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.items = ItemEmbedding(cfg.num_items, cfg.d_model, cfg.item_table_multiple,
                               cfg.item_std, rngs)
    if cfg.positions == "learned":
      self.pos = nnx.Param(
          nnx.initializers.normal(cfg.position_std)(rngs.params(), (cfg.max_len, cfg.d_model)),
          out_sharding=("seq", "embed"), eager_sharding=False)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs: nnx.Rngs) -> Block | HSTUBlock:
      if cfg.block == "hstu":
        return HSTUBlock(cfg.d_model, cfg.n_heads, cfg.qk_dim, cfg.v_dim, cfg.max_len,
                         cfg.time_buckets, cfg.init_std, rngs)
      return Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.mlp, cfg.norm,
                   cfg.positions == "rope", cfg.init_std, rngs, cfg.sasrec_layout)

    self.layers = make_layers(rngs)
    if cfg.final_norm:
      self.final_norm = Norm(cfg.d_model, cfg.norm)


class RecommenderFns:
  """Pure functions over pure-dict params (global or local shards).

  Param dict keys: `items`, `pos` (learned positions only), `layers` (every leaf
  has a leading stacked-layer axis), `final_norm`.
  """

  def __init__(self, cfg: ModelConfig, loss: losses.LossConfig | None = None):
    self.cfg = cfg
    self.loss_cfg = loss or losses.LossConfig()
    abstract = nnx.eval_shape(lambda: Recommender(cfg, nnx.Rngs(0)))
    self._graphdefs = {
        "items": nnx.graphdef(abstract.items),
        "layers": nnx.graphdef(abstract.layers),
    }
    if cfg.final_norm:
      self._graphdefs["final_norm"] = nnx.graphdef(abstract.final_norm)
    state = nnx.state(abstract, nnx.Param)
    self.logical_axes: Params = logical_axes_of(state)
    self.shapes: Params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, cfg.storage_dtype), nnx.to_pure_dict(state))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_items: int) -> "RecommenderFns":
    """The model and item loss a run config describes, for a catalogue of `num_items`."""
    return cls(ModelConfig.from_config(config.model, num_items, config.data.max_len),
               losses.LossConfig.from_config(config.get("loss")))

  # ----------------------------------------------------------------- creation
  def init(self, key: jax.Array) -> Params:
    """Global (unsharded) params; jit with out_shardings to create them sharded."""
    model = Recommender(self.cfg, nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda x: x.astype(self.cfg.storage_dtype), params)

  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.shapes))

  def context(self, tensor_axis: str | tuple[str, ...] | None = None,
              row_keys: jax.Array | None = None, dropout_rate: float | None = None,
              loss_key: jax.Array | None = None, batch_axes: tuple[str, ...] = (),
              table_axes: tuple[str, ...] | None = None,
              row_gradients: str = "exact") -> Context:
    return Context(tensor_axis=tensor_axis,
                   dropout_rate=self.cfg.dropout if dropout_rate is None else dropout_rate,
                   row_keys=row_keys, dtype=self.cfg.compute_dtype, loss_key=loss_key,
                   batch_axes=batch_axes, attention=self.cfg.attention, table_axes=table_axes,
                   row_gradients=row_gradients, dropout_placement=self.cfg.dropout_placement)

  # ------------------------------------------------------------------- pieces
  def item_table(self, params: Params) -> ItemEmbedding:
    """The item table module over `params['items']` (a shard of it inside shard_map)."""
    return nnx.merge(self._graphdefs["items"], params["items"])

  def lookup(self, params: Params, inputs: jax.Array, ctx: Context) -> jax.Array:
    """The item rows of ids [B, T] -> [B, T, D] (vocab-parallel over ctx's axis)."""
    return self.item_table(params).lookup(inputs, ctx)

  def embed(self, params: Params, tokens: Tokens, ctx: Context) -> jax.Array:
    """tokens (ids [B, T], or a dict with "inputs" and "segments") -> h [B, T, D]."""
    tokens = as_tokens(tokens)
    return self.embed_rows(params, self.lookup(params, tokens["inputs"], ctx), tokens, ctx)

  def embed_rows(self, params: Params, rows: jax.Array, tokens: Tokens,
                 ctx: Context) -> jax.Array:
    """Looked-up item rows [B, T, D] -> h: scale, positions, dropout. Split from the
    lookup so a pipeline can back-propagate to the rows and scatter-add their
    gradient into the table's (sparse) accumulator itself."""
    h = rows
    if self.cfg.embed_scale:
      h = h * jnp.asarray(self.cfg.d_model ** 0.5, h.dtype)
    if "pos" in params:
      origin = self.cfg.position_origin
      _, positions = attention_mask(tokens, origin)
      pos = params["pos"]
      if origin == "end":   # the last item uses the last row whatever the row width
        positions = positions + (pos.shape[0] - positions.shape[1])
      h = h + jnp.take(pos, positions, axis=0).astype(h.dtype)
    return dropout(h, ctx, 0)

  def layer(self, layer_params: Params, h: jax.Array, tokens: Tokens, ctx: Context,
            layer_id: jax.Array | int) -> jax.Array:
    """One transformer block on h; `tokens` give the (segment-)causal mask and positions."""
    block = self.block(layer_params)
    mask, positions = attention_mask(tokens, self.cfg.position_origin)
    if self.cfg.block != "hstu":
      return block(h, mask, positions, ctx, layer_id)
    times = None
    if self.uses_time:
      if "timestamps" not in tokens:
        raise ValueError("the HSTU time bias needs per-token timestamps in the batch "
                         "(tokens['timestamps'], tokens['target_times'])")
      times = (tokens["target_times"], tokens["timestamps"])
    return block(h, mask, positions, ctx, layer_id, times)

  def block(self, layer_params: Params) -> Block | HSTUBlock:
    """One layer's module over its params (one slice of the stacked layers)."""
    return nnx.merge(self._graphdefs["layers"], layer_params)

  def layers(self, layers_params: Params, h: jax.Array, tokens: Tokens, ctx: Context,
             layer_ids: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """Scans stacked blocks over h. `active[i]` False skips slot i (pipeline padding)."""
    # The carry varies over whatever the stacked params vary over (e.g. `pipe`),
    # except the tensor axis, which each block reduces over.
    h = make_varying(h, tree_varying_axes(layers_params) - {ctx.tensor_axis})

    tokens = as_tokens(tokens)
    layer = remat(lambda p, h, lid: self.layer(p, h, tokens, ctx, lid), self.cfg.remat)

    def body(h, xs):
      p, lid, on = xs
      if on is None:
        return layer(p, h, lid), None
      with jax.named_scope(LAYER_SLOT_SCOPE):  # named for the HLO accounting
        return jax.lax.cond(on, lambda h: layer(p, h, lid), lambda h: h, h), None

    h, _ = jax.lax.scan(body, h, (layers_params, layer_ids, active))
    return h

  def final_hidden(self, params: Params, h: jax.Array) -> jax.Array:
    if not self.cfg.final_norm:
      return h
    return nnx.merge(self._graphdefs["final_norm"], params["final_norm"])(h)

  @property
  def uses_time(self) -> bool:
    """Whether the model reads per-token timestamps (HSTU's time bias)."""
    return self.cfg.block == "hstu" and self.cfg.time_bias

  # --------------------------------------------------------------- item head
  def full_softmax_spec(self, table: jax.Array, ctx: Context) -> losses.FullSoftmax:
    return losses.FullSoftmax(num_items=self.cfg.num_items, axes=ctx.item_axes or None,
                              tile=self.loss_cfg.tile(table.shape[0]),
                              chunk=self.loss_cfg.token_chunk)

  def negatives(self, params: Params, target_ids: jax.Array, target_rows: jax.Array,
                ctx: Context, tokens: dict | None) -> losses.Negatives:
    """The sampled softmax's negatives: uniform draws — per token from its own key (HSTU)
    or one set per step (`loss.shared_negatives`) — and/or the batch's own targets
    (gathered over the data axes when `loss.in_batch_global`), with their logQ and
    the history mask. Every draw comes from the step's key: the same on every mesh."""
    cfg, n_items = self.loss_cfg, self.cfg.num_items
    ids, rows, draw = [], [], None
    uniform = cfg.num_negatives if cfg.negatives in ("uniform", "mixed") else 0
    if uniform and cfg.shared_negatives:
      if ctx.loss_key is None:
        raise ValueError("uniform negatives need the step's key (Context.loss_key)")
      u = losses.uniform_negatives(ctx.loss_key, uniform, n_items)
      ids.append(u)
      rows.append(self.lookup(params, u, ctx).astype(jnp.float32))
    elif uniform:
      def draw(keys):
        per = jax.vmap(lambda k: losses.uniform_negatives(jax.random.wrap_key_data(k),
                                                          uniform, n_items))(keys)
        return per, self.lookup(params, per, ctx)
    batch = None
    if cfg.negatives in ("in_batch", "mixed"):
      batch, b_rows = target_ids, target_rows.astype(jnp.float32)
      if cfg.in_batch_global and ctx.batch_axes:
        batch = jax.lax.all_gather(batch, ctx.batch_axes, tiled=True)
        b_rows = jax.lax.all_gather(b_rows, ctx.batch_axes, tiled=True)
      ids.append(batch)
      rows.append(b_rows)
    shared = losses.Candidates(jnp.concatenate(ids), jnp.concatenate(rows)) if ids else None
    hits = (losses.history_hits(tokens, n_items)
            if cfg.mask_history and tokens is not None else None)
    return losses.Negatives(shared, draw, losses.in_batch_log_q(batch, uniform, n_items), hits)

  def token_keys(self, ctx: Context, tokens: dict | None, order: jax.Array,
                 width: int) -> jax.Array:
    """Raw PRNG key data [N, 2] per token: (step key, global row, column), so a
    token draws the same negatives on every mesh. `tokens["rows"]` holds the rows'
    global indices (default: 0..B-1, the single-device reference)."""
    if ctx.loss_key is None:
      return jnp.zeros((order.shape[0], 2), jnp.uint32)
    rows = order // width
    if tokens is not None and "rows" in tokens:
      rows = tokens["rows"][rows]
    keys = jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(ctx.loss_key, r), c))(
        rows, order % width)
    return jax.random.key_data(keys)

  def item_losses(self, params: Params, h: jax.Array, targets: jax.Array, ctx: Context,
                  tokens: Tokens | None = None, order: jax.Array | None = None,
                  width: int = 1) -> jax.Array:
    """Per-token item loss [N] of final hidden states h [N, D] (real targets first:
    see `losses.compact`; `order` maps them back to flat [B * T] positions of
    `tokens`, `width` = T); 0 where the target is padding."""
    if self.loss_cfg.type == "full":
      table = params["items"]["table"]
      spec = self.full_softmax_spec(table, ctx)
      if ctx.token_axes:   # rows sharding: every shard scores every data replica's tokens
        return losses.gathered_full_softmax(h, targets, table, spec, ctx.token_axes)
      return losses.full_softmax(h, targets, table, spec)
    tokens = as_tokens(tokens)
    if order is None:
      order = jnp.arange(targets.shape[0])
    target_rows = self.lookup(params, targets, ctx)
    negatives = self.negatives(params, targets, target_rows, ctx, tokens)
    keys = self.token_keys(ctx, tokens, order, width)
    return losses.sampled_softmax(h, targets, target_rows, keys, order, negatives,
                                  self.loss_cfg)

  def head_loss(self, params: Params, h: jax.Array, targets: jax.Array, ctx: Context,
                tokens: Tokens | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of the item loss over non-padding targets, their count) for h [B, T, D]."""
    h = self.final_hidden(params, h)
    hc, tc, order = _compacted(h, targets)
    per_token = self.item_losses(params, hc, tc, ctx, tokens, order, targets.shape[1])
    return per_token.sum(), (targets > 0).sum().astype(jnp.float32)

  def head_forward(self, params: Params, y: jax.Array, targets: jax.Array, ctx: Context,
                   scale: float | jax.Array, tokens: Tokens | None = None):
    """The head in two phases, for the pipeline: this call gives (scale x loss sum,
    its cotangent w.r.t. the last layer's output y [B, T, D], the gradient of the
    small params (all but the item table), and `saved`); `head_table_grad(saved)`
    later gives the item table's gradient. The table's gradient is table-sized, so
    the pipeline forms it once per step rather than once per microbatch."""
    norm = params.get("final_norm", {})
    h, norm_vjp = jax.vjp(lambda n, y: self.final_hidden({"final_norm": n}, y), norm, y)
    hc, tc, order = _compacted(h, targets)
    saved = {"h": hc, "targets": tc}
    if self.loss_cfg.type == "full":
      table = params["items"]["table"]
      spec = self.full_softmax_spec(table, ctx)
      if ctx.token_axes:   # rows sharding: every shard scores every data replica's tokens
        per_token, d_part, lse, h_all, t_all = losses.gathered_full_softmax_forward(
            hc, tc, table, spec, ctx.token_axes)
        d_hc = losses.own_tokens_grad(d_part, ctx.token_axes)
      else:
        per_token, d_hc, lse = losses.full_softmax_forward(hc, tc, table, spec)
        h_all, t_all = hc, tc
      saved = {"h": h_all, "targets": t_all, "lse": lse}
    else:
      tokens = as_tokens(tokens)
      width = targets.shape[1]
      per_token, vjp_h = jax.vjp(
          lambda hh: self.item_losses(params, hh, tc, ctx, tokens, order, width), hc)
      (d_hc,) = vjp_h(jnp.ones_like(per_token))
      saved["order"] = order
      saved["tokens"] = tokens
    loss = per_token.sum() * scale
    d_h = jnp.zeros(hc.shape, jnp.float32).at[order].set(d_hc.astype(jnp.float32) * scale)
    d_h = make_varying(d_h.reshape(h.shape).astype(h.dtype), varying_axes(h))
    d_norm, d_y = norm_vjp(d_h)
    d_small = {k: jax.tree.map(jnp.zeros_like, v) for k, v in params.items()
               if k not in ("items", "final_norm", "layers")}
    if "final_norm" in params:
      d_small["final_norm"] = d_norm
    return loss, d_y, d_small, saved

  def head_table_grad(self, params: Params, saved: Params, ctx: Context,
                      scale: float | jax.Array) -> jax.Array:
    """The item table's (shard's) gradient of the losses `head_forward` saved these
    for; `saved` leaves carry a leading microbatch axis [M, ...]."""
    table = params["items"]["table"]
    if self.loss_cfg.type == "full":
      flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in saved.items()}
      g = jnp.full(flat["targets"].shape, scale, jnp.float32)
      return losses.full_softmax_table_grad(flat["h"], flat["targets"], flat["lse"], g,
                                            table, self.full_softmax_spec(table, ctx))

    def one(acc, mb):
      def total(tbl):
        p = {**params, "items": {**params["items"], "table": tbl}}
        width = mb["tokens"]["inputs"].shape[1]
        return self.item_losses(p, mb["h"], mb["targets"], ctx, mb["tokens"], mb["order"],
                                width).sum() * scale
      out, vjp_t = jax.vjp(total, table)
      (d_table,) = vjp_t(jnp.ones_like(out))
      return acc + d_table.astype(jnp.float32), None

    zero = make_varying(jnp.zeros(table.shape, jnp.float32), varying_axes(table))
    acc, _ = jax.lax.scan(one, zero, saved)
    return acc

  def last_hidden(self, params: Params, tokens: Tokens, ctx: Context) -> jax.Array:
    """Final-normed hidden state at the last position (rows are left-padded)."""
    h = self.embed(params, tokens, ctx)
    h = self.layers(params["layers"], h, tokens, ctx, jnp.arange(self.cfg.n_layers))
    return self.final_hidden(params, h[:, -1])

  def rank(self, params: Params, h_last: jax.Array, target: jax.Array, exclude: jax.Array,
           ctx: Context) -> jax.Array:
    return self.item_table(params).target_rank(h_last, target, exclude, ctx,
                                               normalize=self.loss_cfg.l2_norm)

  def top_k(self, params: Params, h_last: jax.Array, k: int, exclude: jax.Array,
            ctx: Context):
    return self.item_table(params).top_k(h_last, k, exclude, ctx,
                                         normalize=self.loss_cfg.l2_norm)

  # ------------------------------------------------------------ the reference
  def loss(self, params: Params, tokens: Tokens, targets: jax.Array,
           ctx: Context) -> tuple[jax.Array, jax.Array]:
    """(loss sum, token count) over a batch: the whole forward on one device's rows."""
    h = self.embed(params, tokens, ctx)
    h = self.layers(params["layers"], h, tokens, ctx, jnp.arange(self.cfg.n_layers))
    return self.head_loss(params, h, targets, ctx, tokens)

  def logits(self, params: Params, tokens: Tokens, ctx: Context) -> jax.Array:
    """Full logits [B, T, items] (single device only; for tests and small models)."""
    h = self.embed(params, tokens, ctx)
    h = self.final_hidden(params, self.layers(params["layers"], h, tokens, ctx,
                                              jnp.arange(self.cfg.n_layers)))
    flat = h.reshape(-1, h.shape[-1])
    return self.item_table(params).local_logits(flat, ctx).reshape(*h.shape[:2], -1)


# What each `model.remat` policy keeps of a layer for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def remat(layer, policy: str):
  """`layer` under the named rematerialisation policy ("none": as it is)."""
  if policy == "none":
    return layer
  return jax.checkpoint(layer, policy=REMAT_POLICIES[policy])


def _compacted(h: jax.Array, targets: jax.Array):
  """(h [N, D], targets [N], order): the real targets' positions first."""
  flat_h = h.reshape(-1, h.shape[-1])
  flat_t = jnp.asarray(targets).reshape(-1)
  order, _ = losses.compact(flat_t)
  return flat_h[order], flat_t[order], order


def as_tokens(tokens: Tokens | None) -> dict[str, jax.Array] | None:
  """A batch's per-token arrays as a dict: a bare id array [B, T] is one left-padded
  sequence per row (one segment)."""
  if tokens is None or isinstance(tokens, dict):
    return tokens
  return {"inputs": tokens}


def segment_ids(tokens: Tokens) -> jax.Array:
  """[B, T] segment of each position (0 = padding): "segments" when rows are packed,
  else 1 for every real item."""
  tokens = as_tokens(tokens)
  if "segments" in tokens:
    return tokens["segments"]
  return (tokens["inputs"] > 0).astype(jnp.int32)


def attention_mask(tokens: Tokens, origin: str = "start") -> tuple[jax.Array, jax.Array]:
  """Causal mask within each segment [B, T, T], and per-token positions [B, T].

  Positions count from the segment's first item (`origin="start"`: 0, 1, ..., so
  appending an item leaves every earlier position — and a KV cache — valid) or back
  from its last item, which then sits at T - 1 (`"end"`, SASRec's right-aligned
  rows). Either way a packed segment gets the positions it would have alone. A
  padding query keeps its own key so its (ignored) attention stays finite.
  """
  seg = segment_ids(tokens)
  t = seg.shape[1]
  idx = jnp.arange(t)
  causal = idx[None, :] <= idx[:, None]
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  mask = (causal[None] & same) | ((seg == 0)[:, :, None] & jnp.eye(t, dtype=bool)[None])
  if origin == "start":
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    begin = jax.lax.cummax(jnp.where(first, idx[None], 0), axis=1)
    return mask, jnp.where(seg > 0, idx[None] - begin, 0)
  last = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones_like(seg[:, :1], bool)], 1)
  end = jax.lax.cummin(jnp.where(last, idx[None], t), axis=1, reverse=True)
  positions = jnp.where(seg > 0, (t - 1) - (end - idx[None]), 0)
  return mask, positions
