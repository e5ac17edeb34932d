"""The SASRec block's `original` layout: a numpy reference of one layer, the parallel
paths, causality and the KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.recommender import ModelConfig, RecommenderFns, attention_mask
from jaxrec.serve.incremental import Incremental
from tests.helpers import synthetic_batch, tiny_config
from tests.test_hstu import check

ORIGINAL = {"model.sasrec_layout": "original"}


def layer_numpy(p, x, mask):
  """One original-layout SASRec layer in float64 (Kang & McAuley 2018, as the HSTU
  paper's SASRec baseline runs it): queries from the normalised input, keys and values
  from the raw input, a post-attention norm, the feed-forward's residual from it."""
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
  a = a / a.sum(-1, keepdims=True)
  attn = np.einsum("bhqk,bkhe,hed->bqd", a, v, p["attn"]["out"])
  h = norm(q_in + attn, p["norm2"])
  return h + np.maximum(h @ p["mlp"]["w_in"], 0) @ p["mlp"]["w_out"]


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


@pytest.mark.parametrize("spec, overrides", [
    ("tensor:4", {}),
    ("data:2,pipe:2,tensor:2", {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4}),
])
def test_original_layout_on_meshes_matches_the_reference(spec, overrides):
  check(tiny_config(**ORIGINAL, **overrides), spec, synthetic_batch(6))


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

