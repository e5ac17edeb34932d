import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.recommender import ModelConfig, RecommenderFns
from tests.helpers import synthetic_batch


def fns_for(**kw):
  cfg = ModelConfig(num_items=50, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32, **kw)
  return RecommenderFns(cfg)


@pytest.mark.parametrize("kw", [
    {}, {"positions": "rope", "mlp": "swiglu", "norm": "rmsnorm"},
    {"positions": "none"}, {"dtype": "bfloat16"},
])
def test_causality(kw):
  """Changing a later item never changes an earlier position's logits."""
  fns = fns_for(**kw)
  params = fns.init(jax.random.key(0))
  x = jnp.array([[0, 0, 3, 4, 5, 6, 7, 8]])
  base = fns.logits(params, x, fns.context())
  for pos in range(2, 8):
    changed = x.at[0, pos].set(42)
    out = fns.logits(params, changed, fns.context())
    np.testing.assert_array_equal(np.asarray(out[0, :pos]), np.asarray(base[0, :pos]))
    assert not np.allclose(np.asarray(out[0, pos]), np.asarray(base[0, pos]))


def test_padding_rows_never_score():
  fns = fns_for()
  params = fns.init(jax.random.key(0))
  assert params["items"]["table"].shape == (128, 16)
  logits = fns.logits(params, jnp.array([[0, 1, 2, 3, 4, 5, 6, 7]]), fns.context())
  assert np.all(np.asarray(logits[..., 0]) < -1e29)
  assert np.all(np.asarray(logits[..., 51:]) < -1e29)
  np.testing.assert_array_equal(np.asarray(params["items"]["table"][51:]), 0.0)


def test_loss_is_full_softmax_ce_over_non_padding_positions():
  fns = fns_for()
  params = fns.init(jax.random.key(1))
  b = synthetic_batch(num_items=50, batch=4)
  total, count = fns.loss(params, b["inputs"], b["targets"], fns.context())
  logits = np.asarray(fns.logits(params, b["inputs"], fns.context()), np.float64)
  logits = logits[..., 1:51]
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  t = b["targets"]
  tgt = np.take_along_axis(logits, np.maximum(t - 1, 0)[..., None], -1)[..., 0]
  expected = ((lse - tgt) * (t > 0)).sum()
  assert int(count) == int((t > 0).sum())
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_dropout_depends_on_row_not_on_batch_position():
  fns = RecommenderFns(ModelConfig(num_items=50, max_len=8, d_model=16, n_heads=2,
                                   n_layers=1, d_ff=32, dropout=0.5))
  params = fns.init(jax.random.key(0))
  b = synthetic_batch(num_items=50, batch=4)
  keys = jax.random.split(jax.random.key(3), 4)
  full = fns.logits(params, b["inputs"], fns.context(row_keys=keys))
  part = fns.logits(params, b["inputs"][2:], fns.context(row_keys=keys[2:]))
  np.testing.assert_allclose(np.asarray(full[2:]), np.asarray(part), rtol=1e-5, atol=1e-5)
  no_drop = fns.logits(params, b["inputs"], fns.context())
  assert not np.allclose(np.asarray(full), np.asarray(no_drop))


def test_layers_are_stacked_with_logical_axes():
  fns = fns_for()
  assert fns.shapes["layers"]["attn"]["qkv"].shape == (2, 16, 3, 2, 8)
  assert fns.logical_axes["layers"]["attn"]["qkv"] == ("layers", "embed", None, "heads", "kv")
  assert fns.logical_axes["items"]["table"] == ("items", "embed")
  for axes in jax.tree.leaves(fns.logical_axes["layers"], is_leaf=lambda x: isinstance(x, tuple)):
    assert axes[0] == "layers"


@pytest.mark.parametrize("kw,item_std,pos_std", [
    ({}, 64 ** -0.5, 0.02),                                   # jaxrec's: scaled input std 1
    ({"embed_scale": False, "init_std": 0.05}, 0.05, 0.05),
    ({"item_init_std": 0.02, "position_init_std": 64 ** -0.5}, 0.02, 64 ** -0.5),  # reference
])
def test_embedding_init_scales(kw, item_std, pos_std):
  """Item rows and learned positions start at the standard deviations asked for (the
  generative-recommenders recipes start them equal after the sqrt(d) input scale)."""
  cfg = ModelConfig(num_items=4000, max_len=200, d_model=64, n_heads=2, n_layers=1, d_ff=32,
                    **kw)
  params = RecommenderFns(cfg).init(jax.random.key(0))
  rows = np.asarray(params["items"]["table"])[1:4001]
  np.testing.assert_allclose(rows.std(), item_std, rtol=0.02)
  np.testing.assert_allclose(np.asarray(params["pos"]).std(), pos_std, rtol=0.02)
