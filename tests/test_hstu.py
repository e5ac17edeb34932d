"""The HSTU block: a numpy reference of one layer, the parallel paths, causality."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.hstu import time_buckets
from jaxrec.models.recommender import ModelConfig, RecommenderFns, attention_mask
from jaxrec.train import reference
from tests.helpers import (RTOL, global_batch, max_rel_diff, program, synthetic_batch,
                           tiny_config)
from tests.test_pipeline import canonical

HSTU = {"model.block": "hstu", "model.final_norm": False}


def with_times(batch, seed=0):
  """Adds increasing per-row timestamps (seconds) and the times of the targets."""
  rng = np.random.default_rng(seed)
  b, t = batch["inputs"].shape
  gaps = rng.integers(1, 10 ** 6, (b, t + 1)).cumsum(1)
  times = np.where(batch["inputs"] > 0, gaps[:, :-1], 0)
  target_times = np.where(batch["targets"] > 0, gaps[:, 1:], 0)
  return {**batch, "timestamps": times.astype(np.int64),
          "target_times": target_times.astype(np.int64)}


def layer_numpy(p, x, mask, positions, query_times, key_times, max_len, qk, dv, buckets):
  """One HSTU layer in float64, written from the paper's equations."""
  def norm(v):
    v = v - v.mean(-1, keepdims=True)
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)

  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  b, t, d = x.shape
  h = p["uvqk"].shape[1]
  proj = silu(np.einsum("btd,dhe->bthe", norm(x), p["uvqk"]))
  u, v = proj[..., :dv], proj[..., dv:2 * dv]
  q, k = proj[..., 2 * dv:2 * dv + qk], proj[..., 2 * dv + qk:]
  out = np.zeros_like(x)
  for r in range(b):
    for i in range(t):
      a = np.zeros((h, dv))
      for j in range(t):
        if not mask[r, i, j]:
          continue
        dt = abs(float(query_times[r, i]) - float(key_times[r, j]))
        bucket = min(max(int(np.floor(np.log(max(dt, 1.0)) / 0.301)), 0), buckets)
        rab = p["pos_bias"][positions[r, j] - positions[r, i] + max_len - 1] + p["time_bias"][bucket]
        s = silu(np.einsum("he,he->h", q[r, i], k[r, j]) + rab) / max_len
        a += s[:, None] * v[r, j]
      gated = u[r, i] * norm(a.reshape(-1)).reshape(h, dv)
      out[r, i] = x[r, i] + np.einsum("he,hed->d", gated, p["out"]) + p["out_bias"]
  return out


def test_one_layer_equals_the_numpy_reference():
  cfg = ModelConfig(num_items=50, max_len=8, d_model=12, n_heads=3, n_layers=1, block="hstu",
                    hstu_qk_dim=5, hstu_v_dim=4, final_norm=False, time_buckets=16)
  fns = RecommenderFns(cfg)
  params = fns.init(jax.random.key(0))
  layer = jax.tree.map(lambda w: w[0], params["layers"])
  layer = {**layer, "pos_bias": jax.random.normal(jax.random.key(1), layer["pos_bias"].shape),
           "time_bias": jax.random.normal(jax.random.key(2), layer["time_bias"].shape)}
  batch = with_times(synthetic_batch(1, batch=3, max_len=8, num_items=50))
  x = jax.random.normal(jax.random.key(3), (3, 8, 12))
  tokens = {k: jnp.asarray(v) for k, v in batch.items() if k != "targets"}
  got = fns.layer(layer, x, tokens, fns.context(dropout_rate=0.0), 0)
  mask, positions = attention_mask(tokens)
  want = layer_numpy(jax.tree.map(np.asarray, layer), np.asarray(x, np.float64),
                     np.asarray(mask), np.asarray(positions), batch["target_times"],
                     batch["timestamps"], 8, 5, 4, 16)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_output_projection_starts_as_the_references_linear():
  """Weight xavier uniform U(+-sqrt(6 / (fan_in + fan_out))), bias PyTorch's Linear
  default U(+-1/sqrt(fan_in)): both centred on zero (a [0, 2 limit) draw, all positive,
  once stood in for the weight)."""
  heads, dv, d = 4, 64, 256
  cfg = ModelConfig(num_items=50, max_len=8, d_model=d, n_heads=heads, n_layers=2,
                    block="hstu", hstu_qk_dim=16, hstu_v_dim=dv, final_norm=False)
  layers = RecommenderFns(cfg).init(jax.random.key(0))["layers"]
  w, b = np.asarray(layers["out"], np.float64), np.asarray(layers["out_bias"], np.float64)
  limit = np.sqrt(6.0 / (heads * dv + d))
  assert w.shape == (2, heads, dv, d) and np.abs(w).max() <= limit
  assert abs(w.mean()) < 4 * limit / np.sqrt(3 * w.size)        # 4 standard errors
  np.testing.assert_allclose(w.std(), limit / np.sqrt(3), rtol=0.02)
  assert not np.allclose(w[0], w[1])                              # layers drawn apart
  bias_limit = 1.0 / np.sqrt(heads * dv)
  assert np.abs(b).max() <= bias_limit and abs(b.mean()) < 4 * bias_limit / np.sqrt(3 * b.size)
  np.testing.assert_allclose(b.std(), bias_limit / np.sqrt(3), rtol=0.1)


def test_time_buckets_follow_the_published_log_scale():
  day, hour = 86400, 3600
  t = jnp.asarray([[0, hour, day]])
  b = np.asarray(time_buckets(t, t, 128))[0]
  assert b[1, 0] == 27 and b[2, 0] == 37 and b[0, 0] == 0   # 1 h -> 27, 1 day -> 37


def check(config, spec, host=None):
  """One step's loss and gradients on the mesh `spec` equal the 1-device reference's
  (default batch: synthetic, with timestamps)."""
  devices = int(np.prod([int(part.split(":")[1]) for part in spec.split(",")]))
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  host = with_times(synthetic_batch(6)) if host is None else host
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  params = canonical(prog, state.params)
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, host,
                                                 rng=jax.device_get(state.rng), step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(canonical(prog, grads), ref_grads) < RTOL


@pytest.mark.parametrize("spec, overrides", [
    ("tensor:4", {}),
    ("data:2,pipe:2,tensor:2", {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4}),
    pytest.param("data:2,pipe:2,tensor:2", {"pipeline.schedule": "gpipe",
                                            "pipeline.microbatches": 2},
                 marks=pytest.mark.slow),
    pytest.param("data:2,pipe:2,tensor:2", {"pipeline.schedule": "interleaved",
                                            "pipeline.virtual_stages": 2,
                                            "pipeline.microbatches": 2, "model.n_layers": 4},
                 marks=pytest.mark.slow),
])
def test_hstu_on_meshes_matches_the_reference(spec, overrides):
  check(tiny_config(**HSTU, **overrides), spec)


def test_hstu_is_causal():
  config = tiny_config(**HSTU, **{"model.dropout": 0.0})
  fns = RecommenderFns.from_config(config, 300)
  params = fns.init(jax.random.key(4))
  batch = with_times(synthetic_batch(2, batch=2))
  tokens = {k: jnp.asarray(v) for k, v in batch.items() if k != "targets"}
  base = fns.logits(params, tokens, fns.context())
  changed = {**tokens, "inputs": tokens["inputs"].at[:, 5].set(7)}
  moved = fns.logits(params, changed, fns.context())
  np.testing.assert_allclose(base[:, :5], moved[:, :5], atol=1e-6)
  assert not np.allclose(base[:, 5], moved[:, 5])


def test_time_bias_is_switched_off_with_a_note_when_the_data_has_no_times(tmp_path, caplog):
  from jaxrec.train.loop import build
  path = tmp_path / "log.txt"
  path.write_text("".join(f"{u} {i}\n" for u in range(1, 30) for i in range(1, 8)))
  config = tiny_config(**HSTU, **{"data.path": str(path), "data.format": "sasrec"})
  with caplog.at_level(logging.WARNING):
    _, dataset, fns, prog = build(config)
  assert not dataset.has_time and not fns.uses_time and not prog.config.model.time_bias
  assert "has no timestamps" in caplog.text
  embedded = tiny_config(**HSTU)
  _, data, fns, _ = build(embedded)
  assert data.has_time and fns.uses_time    # MovieLens csv: real times, the bias is on
