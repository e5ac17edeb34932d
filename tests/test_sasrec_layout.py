"""The SASRec block's `original` layout and the reference's dropout placement: numpy
references of one layer, the parallel paths, causality and the KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.layers import MLP_HIDDEN_SITE, PROBS_SITE, dropout, sharded_dropout
from jaxrec.models.recommender import ModelConfig, RecommenderFns, attention_mask
from jaxrec.serve.incremental import Incremental
from tests.helpers import synthetic_batch, tiny_config
from tests.test_hstu import check

ORIGINAL = {"model.sasrec_layout": "original"}
REFERENCE_DROPOUT = {**ORIGINAL, "model.dropout_placement": "reference"}


def layer_numpy(p, x, mask, drop=None):
  """One original-layout SASRec layer in float64 (Kang & McAuley 2018, as the HSTU
  paper's SASRec baseline runs it): queries from the normalised input, keys and values
  from the raw input, a post-attention norm, the feed-forward's residual from it.
  `drop`: the reference placement's dropout multipliers (probs, mlp hidden, mlp out)."""
  m_probs, m_hidden, m_out = drop if drop is not None else (1.0, 1.0, 1.0)
  def norm(v, n):
    v = v - v.mean(-1, keepdims=True)
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6) * n["scale"] + n["bias"]

  w = p["attn"]["qkv"]
  q_in = norm(x, p["norm1"])
  q = np.einsum("btd,dhe->bthe", q_in, w[:, 0])
  k = np.einsum("btd,dhe->bthe", x, w[:, 1])
  v = np.einsum("btd,dhe->bthe", x, w[:, 2])
  s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None], s, -1e30)
  a = np.exp(s - s.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True) * m_probs
  attn = np.einsum("bhqk,bkhe,hed->bqd", a, v, p["attn"]["out"])
  h = norm(q_in + attn, p["norm2"])
  return h + (np.maximum(h @ p["mlp"]["w_in"], 0) * m_hidden) @ p["mlp"]["w_out"] * m_out


def test_one_layer_equals_the_numpy_reference():
  cfg = ModelConfig(num_items=50, max_len=8, d_model=12, n_heads=3, n_layers=1, d_ff=20,
                    mlp="relu", sasrec_layout="original")
  fns = RecommenderFns(cfg)
  params = fns.init(jax.random.key(0))
  layer = jax.tree.map(lambda w: w[0], params["layers"])
  # non-trivial norms, so a swapped or missing norm cannot pass
  for i, name in enumerate(["norm1", "norm2"]):
    layer[name] = {k: 1.0 + 0.3 * jax.random.normal(jax.random.key(10 + i + 2 * j), (12,))
                   for j, k in enumerate(["scale", "bias"])}
  batch = synthetic_batch(1, batch=3, max_len=8, num_items=50)
  tokens = {"inputs": jnp.asarray(batch["inputs"])}
  x = jax.random.normal(jax.random.key(3), (3, 8, 12))
  got = np.asarray(fns.layer(layer, x, tokens, fns.context(dropout_rate=0.0), 0))
  mask, _ = attention_mask(tokens)
  want = layer_numpy(jax.tree.map(lambda a: np.asarray(a, np.float64), layer),
                     np.asarray(x, np.float64), np.asarray(mask))
  real = batch["inputs"] > 0
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  # and it is not the pre-norm block under another name
  pre = RecommenderFns(dataclasses.replace(cfg, sasrec_layout="pre_norm"))
  other = np.asarray(pre.layer(layer, x, tokens, pre.context(dropout_rate=0.0), 0))
  assert np.abs(other[real] - want[real]).max() > 1e-2


def test_reference_dropout_equals_the_numpy_reference():
  """Attention probabilities, MLP hidden and MLP output dropped, nothing else."""
  cfg = ModelConfig(num_items=50, max_len=8, d_model=12, n_heads=3, n_layers=1, d_ff=20,
                    mlp="relu", sasrec_layout="original", dropout=0.3,
                    dropout_placement="reference")
  fns = RecommenderFns(cfg)
  params = fns.init(jax.random.key(0))
  layer = jax.tree.map(lambda w: w[0], params["layers"])
  batch = synthetic_batch(1, batch=3, max_len=8, num_items=50)
  tokens = {"inputs": jnp.asarray(batch["inputs"])}
  x = jax.random.normal(jax.random.key(3), (3, 8, 12))
  ctx = fns.context(row_keys=jax.random.split(jax.random.key(7), 3))
  got = np.asarray(fns.layer(layer, x, tokens, ctx, 0))
  # the masks the layer draws (layer 0: probs at 2, the MLP at 3), as multipliers
  drop = [np.asarray(f(jnp.ones(shape), ctx, site, **kw), np.float64) for f, shape, site, kw in [
      (sharded_dropout, (3, 3, 8, 8), 2 + PROBS_SITE, {"axis": 1}),
      (sharded_dropout, (3, 8, 20), 3 + MLP_HIDDEN_SITE, {"axis": 2}),
      (dropout, (3, 8, 12), 3, {})]]
  assert all(0.55 < (m > 0).mean() < 0.85 for m in drop)   # keep 0.7: masks drop
  mask, _ = attention_mask(tokens)
  numpy_layer = functools.partial(layer_numpy, jax.tree.map(lambda a: np.asarray(a, np.float64),
                                                             layer),
                                  np.asarray(x, np.float64), np.asarray(mask))
  real = batch["inputs"] > 0
  np.testing.assert_allclose(got[real], numpy_layer(drop)[real], rtol=1e-5, atol=1e-5)
  assert np.abs(got[real] - numpy_layer()[real]).max() > 1e-2
  # the residual placement drops elsewhere: the attention output, not its probabilities
  residual = RecommenderFns(dataclasses.replace(cfg, dropout_placement="residual"))
  other = np.asarray(residual.layer(layer, x, tokens, residual.context(row_keys=ctx.row_keys), 0))
  assert np.abs(other[real] - got[real]).max() > 1e-2


@pytest.mark.parametrize("spec, overrides", [
    ("tensor:4", ORIGINAL),
    ("data:2,pipe:2,tensor:2", {**ORIGINAL, "pipeline.schedule": "1f1b",
                                "pipeline.microbatches": 4}),
    ("tensor:4", REFERENCE_DROPOUT),
    pytest.param("data:2,pipe:2,tensor:2", {**REFERENCE_DROPOUT, "pipeline.schedule": "1f1b",
                                            "pipeline.microbatches": 4},
                 marks=pytest.mark.slow),
])
def test_original_layout_on_meshes_matches_the_reference(spec, overrides):
  """(tiny_config trains with dropout 0.1, so the reference placement's masks are
  checked to be the same on every mesh.)"""
  check(tiny_config(**overrides), spec, synthetic_batch(6))


def test_original_layout_is_causal():
  config = tiny_config(**ORIGINAL, **{"model.dropout": 0.0})
  fns = RecommenderFns.from_config(config, 300)
  params = fns.init(jax.random.key(4))
  tokens = {"inputs": jnp.asarray(synthetic_batch(2, batch=2)["inputs"])}
  base = fns.logits(params, tokens, fns.context())
  changed = {"inputs": tokens["inputs"].at[:, 5].set(7)}
  moved = fns.logits(params, changed, fns.context())
  np.testing.assert_allclose(base[:, :5], moved[:, :5], atol=1e-6)
  assert not np.allclose(base[:, 5], moved[:, 5])


def test_the_kv_cache_serves_the_original_layout():
  cfg = ModelConfig(num_items=60, max_len=16, d_model=16, n_heads=2, n_layers=2, d_ff=32,
                    sasrec_layout="original")
  fns = RecommenderFns(cfg)
  params = fns.init(jax.random.key(5))
  inc = Incremental(fns, params)
  history = [3, 17, 42, 8, 59, 1, 23]
  grown = inc.append(inc.start(history), 11)
  full = inc.start(history + [11])
  np.testing.assert_allclose(grown.hidden, full.hidden, rtol=1e-5, atol=1e-5)
  want = fns.last_hidden(params, np.asarray([history + [11]], np.int32), fns.context())[0]
  np.testing.assert_allclose(full.hidden, want, rtol=1e-5, atol=1e-5)

