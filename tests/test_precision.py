"""Rematerialisation and precision policies: what they keep, what they change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.perf import hlo
from jaxrec.perf.comm import abstract_batch
from jaxrec.train import reference
from tests.helpers import global_batch, max_rel_diff, program, synthetic_batch, tiny_config
from tests.test_pipeline import canonical

BF16_RTOL = 3e-2   # bf16 compute: 8 mantissa bits, different reduction orders per mesh


def loss_and_grads(config, spec, devices):
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, synthetic_batch(7)))
  return prog, state, float(loss), canonical(prog, grads)


def peak(config, spec="data:1", devices=1):
  prog = program(config, spec, devices)
  compiled = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog)).compile()
  return hlo.memory_stats(compiled)["temp_size_in_bytes"]


ACTIVATION_HEAVY = {"model.n_layers": 6, "model.d_model": 32, "model.d_ff": 128,
                    "data.max_len": 32, "train.batch_size": 32, "model.dropout": 0.0}


@pytest.mark.slow
def test_remat_full_keeps_less_than_none_and_changes_nothing():
  none, full = (peak(tiny_config(**ACTIVATION_HEAVY, **{"model.remat": p}))
                for p in ("none", "full"))
  assert full < 0.8 * none, (full, none)
  results = {}
  for policy in ("none", "full", "dots_saveable", "save_attention_out"):
    _, _, loss, grads = loss_and_grads(tiny_config(**{"model.remat": policy}), "data:2", 2)
    results[policy] = (loss, grads)
  for policy, (loss, grads) in results.items():
    assert loss == pytest.approx(results["none"][0], rel=1e-6), policy
    assert max_rel_diff(grads, results["none"][1]) < 1e-6, policy


def test_bf16_compute_pipeline_matches_the_bf16_reference():
  """bf16 compute on data:2,pipe:2,tensor:2 (1F1B) against the 1-device reference in
  bf16: loss within 1%, gradients within 3% of each leaf's largest entry."""
  config = tiny_config(**{"model.dtype": "bfloat16", "pipeline.schedule": "1f1b",
                          "pipeline.microbatches": 2})
  prog, state, loss, grads = loss_and_grads(config, "data:2,pipe:2,tensor:2", 8)
  params = canonical(prog, state.params)
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, synthetic_batch(7),
                                                 rng=jax.device_get(state.rng), step=0)
  assert loss == pytest.approx(float(ref_loss), rel=1e-2)
  assert max_rel_diff(grads, ref_grads) < BF16_RTOL


@pytest.mark.slow
def test_bf16_params_and_optimizer_state_with_an_fp32_master():
  """Storage in bf16 halves params and Adam's moments; the fp32 master copy makes the
  stored params the rounding of what an fp32 run would hold after one step."""
  base = {"model.dropout": 0.0, "train.grad_clip": 0.0}
  low = tiny_config(**base, **{"model.param_dtype": "bfloat16",
                               "train.opt_state_dtype": "bfloat16"})
  prog = program(low, "data:2,tensor:2", 4)
  state = prog.init_state(0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
  master, inner = state.opt_state
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(master))
  moments = [x for x in jax.tree.leaves(inner) if x.ndim > 0]
  assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
  batch = global_batch(prog, synthetic_batch(8))
  state, metrics = prog.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state[0])):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
  # the fp32 run from the same (bf16-representable) start moves within bf16 rounding
  full = program(tiny_config(**base), "data:2,tensor:2", 4)
  start = full.init_state(0).replace(
      params=jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                          full.init_state(0).params))
  after, _ = full.train_step(start, batch)
  # (bf16 moments round nu to 8 bits: the first update, ~lr * sign(g), moves <= 2%)
  assert max_rel_diff(jax.device_get(state.opt_state[0]), jax.device_get(after.params)) < 2e-2
