"""Shared test fixtures: a tiny model, a synthetic batch, tree comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import default_config, with_overrides
from jaxrec.data.batches import to_global
from jaxrec.mesh import make_mesh
from jaxrec.models.recommender import RecommenderFns
from jaxrec.train import reference
from jaxrec.train.step import TrainProgram

RTOL = 1e-5  # fp32 equivalence tolerance (relative to each leaf's largest entry)
NUM_ITEMS = 300
MAX_LEN = 8
BATCH = 16


def tiny_config(**overrides):
  c = default_config()
  c.train.batch_size = BATCH
  c.train.warmup_steps = 2
  c.train.steps = 10
  c.data.max_len = MAX_LEN
  c.model.d_model = 16
  c.model.n_heads = 4
  c.model.n_layers = 2
  c.model.d_ff = 32
  c.model.dropout = 0.1
  return with_overrides(c, overrides)


def tiny_fns(config) -> RecommenderFns:
  return RecommenderFns.from_config(config, NUM_ITEMS)


def synthetic_batch(seed: int = 0, batch: int = BATCH, max_len: int = MAX_LEN,
                    num_items: int = NUM_ITEMS) -> dict[str, np.ndarray]:
  """Left-padded random sequences with a few padding positions per row."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, num_items + 1, (batch, max_len)).astype(np.int32)
  pad = rng.integers(0, max_len // 2, batch)
  for r, p in enumerate(pad):
    inputs[r, :p] = 0
  targets = np.roll(inputs, -1, axis=1)
  targets[:, -1] = rng.integers(1, num_items + 1, batch)
  targets[inputs == 0] = 0
  return {"inputs": inputs, "targets": targets}


def program(config, spec: str, devices: int = 8):
  mesh = make_mesh(spec, jax.devices()[:devices])
  return TrainProgram(config, tiny_fns(config), mesh)


def global_batch(prog, host: dict[str, np.ndarray]):
  return to_global(prog.mesh, host, next(iter(host.values())).shape[0])


def max_rel_diff(a, b) -> float:
  """Largest |a - b| / max|b| over the leaves of two trees."""
  diffs = jax.tree.map(
      lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))
                         / (float(jnp.max(jnp.abs(jnp.asarray(y, jnp.float32)))) + 1e-30)),
      a, b)
  return max(jax.tree.leaves(diffs))


def assert_steps_match_reference(prog, config, steps: int, canon=None):
  """`steps` train steps of `prog` on synthetic batches equal the 1-device reference:
  the loss every step and the params after (fp32, RTOL). `canon` maps the program's
  params to the reference layout (pipelines stack layers per stage)."""
  canon = canon or (lambda p: jax.device_get(p))
  state = prog.init_state(0)
  params, rng = canon(state.params), jax.device_get(state.rng)
  opt_state = prog.tx.init(params)
  for step in range(steps):
    host = synthetic_batch(step)
    state, metrics = prog.train_step(state, global_batch(prog, host))
    loss, grads = reference.loss_and_grads(prog.fns, params, host, rng=rng, step=step)
    params, opt_state = reference.update(prog.tx, params, opt_state, grads,
                                         config.train.grad_clip)
    assert abs(float(metrics["loss"]) - float(loss)) <= RTOL * abs(float(loss))
  assert max_rel_diff(canon(state.params), params) < RTOL
  return state

