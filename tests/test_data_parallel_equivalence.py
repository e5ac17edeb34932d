"""data:N (and tensor x data) vs the single-device reference: same params, same batch."""

import jax
import pytest

from jaxrec.train import reference
from tests.helpers import (RTOL, assert_steps_match_reference, global_batch, max_rel_diff,
                           program, synthetic_batch, tiny_config)


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def ref_program(config):
  return program(config, "data:1", devices=1)


def test_init_is_identical_on_every_mesh(config, ref_program):
  ref = jax.device_get(ref_program.init_state(0).params)
  for spec in ("data:8", "data:2,tensor:4"):
    got = jax.device_get(program(config, spec).init_state(0).params)
    assert max_rel_diff(got, ref) == 0.0


@pytest.mark.parametrize("spec, micro", [("data:8", 1), ("data:4,tensor:2", 2), ("replica:2,data:4", 1)])
def test_loss_and_grads_match_reference(config, spec, micro):
  config = tiny_config(**{"pipeline.microbatches": micro})
  prog = program(config, spec)
  state = prog.init_state(0)
  params, rng = jax.device_get(state.params), jax.device_get(state.rng)
  host = synthetic_batch(1)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, host, rng=rng, step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(jax.device_get(grads), ref_grads) < RTOL


def test_data8_updates_match_reference_over_steps(config, ref_program):
  """Three AdamW steps with clipping and dropout: params stay within 1e-5 relative."""
  prog = program(config, "data:8")
  state = assert_steps_match_reference(prog, config, 3)
  assert int(state.step) == 3
