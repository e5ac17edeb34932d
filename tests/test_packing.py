"""Packed rows: several users per row compute exactly what they would alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data import load_dataset
from jaxrec.data.batches import TrainStream
from jaxrec.data.packing import first_fit, packed_rows
from jaxrec.data.pipeline import train_batches
from jaxrec.data.sequences import TrainExamples
from tests.helpers import (RTOL, global_batch, max_rel_diff, program, tiny_config, tiny_fns)

MAX_LEN = 8


def examples(seed=0, n=8):
  """n windows of 2..5 items (1..4 tokens) over items 1..300."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(2, 6, n)
  items = rng.integers(1, 301, int(sizes.sum())).astype(np.int32)
  return TrainExamples(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), items, MAX_LEN)


def test_first_fit_places_every_example_once_and_respects_capacity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 9, 500)
  order = rng.permutation(500)
  offsets, members = first_fit(lengths, order, capacity=8, window=16)
  assert sorted(members.tolist()) == list(range(500))
  per_row = np.add.reduceat(lengths[members], offsets[:-1])
  assert per_row.max() <= 8
  assert per_row.sum() / (8 * (offsets.shape[0] - 1)) > 0.9   # greedy fills the rows
  again = first_fit(lengths, order, capacity=8, window=16)
  assert all(np.array_equal(a, b) for a, b in zip((offsets, members), again))
  with pytest.raises(ValueError, match="does not fit a row of 8"):
    first_fit(np.asarray([9]), np.asarray([0]), capacity=8)


def batches(ex):
  """The same windows as one packed batch and one unpacked batch (8 rows each)."""
  unpacked = TrainStream(ex, 8, 0).host_batch(0, slice(None))   # epoch 0: all 8 windows
  offsets, members = TrainStream(ex, 8, 0, packing="greedy").plan(0)
  rows = offsets.shape[0] - 1
  packed = packed_rows(ex, offsets, members, np.arange(rows))
  packed = {k: np.concatenate([v, np.zeros((8 - rows, MAX_LEN), v.dtype)])
            for k, v in packed.items()}
  assert packed["inputs"].shape[0] == 8 and (packed["segments"].max(-1) >= 2).any()
  assert (packed["targets"] > 0).sum() == (unpacked["targets"] > 0).sum()
  return packed, unpacked


BLOCKS = {"sasrec": {}, "hstu": {"model.block": "hstu", "model.final_norm": False,
                                  "model.time_bias": False}}


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_a_packed_row_scores_each_token_as_its_sequence_alone(block):
  config = tiny_config(**{"model.dropout": 0.0, "data.max_len": MAX_LEN, **BLOCKS[block]})
  fns = tiny_fns(config)
  params = fns.init(jax.random.key(0))
  ex = examples()
  packed, unpacked = batches(ex)
  ctx = fns.context()
  logits_p = fns.logits(params, {k: packed[k] for k in ("inputs", "segments")}, ctx)
  logits_u = fns.logits(params, unpacked["inputs"], ctx)
  # every (input, target) pair of a window sits in both layouts: match them up
  got, want = [], []
  for r in range(8):
    for c in range(MAX_LEN):
      if packed["targets"][r, c]:
        got.append(np.asarray(logits_p[r, c]))
  for r in range(8):
    for c in range(MAX_LEN):
      if unpacked["targets"][r, c]:
        want.append(np.asarray(logits_u[r, c]))
  key = lambda v: tuple(np.round(v[:5], 4))  # noqa: E731  (order-independent matching)
  got, want = sorted(got, key=key), sorted(want, key=key)
  assert len(got) == len(want) and max(np.abs(a - b).max() for a, b in zip(got, want)) < 1e-5


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_causality_holds_across_segment_boundaries(block):
  config = tiny_config(**{"model.dropout": 0.0, "data.max_len": MAX_LEN, **BLOCKS[block]})
  fns = tiny_fns(config)
  params = fns.init(jax.random.key(1))
  inputs = jnp.asarray([[5, 6, 7, 8, 9, 10, 0, 0]])
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0]])
  base = fns.logits(params, {"inputs": inputs, "segments": segments}, fns.context())
  later = inputs.at[0, 4].set(42)           # a later token of segment 2
  moved = fns.logits(params, {"inputs": later, "segments": segments}, fns.context())
  np.testing.assert_allclose(base[0, :4], moved[0, :4], atol=1e-6)   # earlier: unchanged
  assert not np.allclose(base[0, 4], moved[0, 4])
  other = inputs.at[0, 1].set(42)           # segment 1 never reaches segment 2
  moved = fns.logits(params, {"inputs": other, "segments": segments}, fns.context())
  np.testing.assert_allclose(base[0, 3:6], moved[0, 3:6], atol=1e-6)


@pytest.mark.parametrize("spec, overrides", [
    ("data:1", {}), ("tensor:2", {}),
    pytest.param("pipe:2", {"pipeline.microbatches": 2, "pipeline.schedule": "1f1b"},
                 marks=pytest.mark.slow),
])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(spec, overrides):
  config = tiny_config(**{"model.dropout": 0.0, "data.max_len": MAX_LEN,
                          "train.batch_size": 8, **overrides})
  devices = int(spec.split(":")[1])
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  packed, unpacked = batches(examples(3))
  results = []
  for host in (packed, unpacked):
    loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
    results.append((float(loss), jax.device_get(grads)))
  assert results[0][0] == pytest.approx(results[1][0], rel=RTOL)
  assert max_rel_diff(results[0][1], results[1][1]) < RTOL


def test_packing_fills_rows_of_the_embedded_data():
  config = tiny_config(**{"data.max_len": 50})
  data = load_dataset(config.data)
  unpacked = TrainStream(data.train, 64, 0).fill_rate()
  packed = TrainStream(data.train, 64, 0, packing="greedy").fill_rate()
  assert packed > 0.95 > unpacked


def test_grain_iterator_state_resumes_packed_batches_exactly_across_epochs():
  """Save the iterator's state mid-way (after an epoch boundary), start a fresh stream
  from it: the same batches follow, and epochs before the saved one are never
  planned again."""
  ex = examples(5, n=40)
  rows = slice(0, 8)

  def stream():
    return TrainStream(ex, 8, 7, packing="greedy")

  it = train_batches(stream(), rows, 0, prefetch=2)
  first = [next(it) for _ in range(9)]       # ~3 epochs of ~24 rows
  state = it.get_state()
  assert state["step"] == 9 and state["epoch"] >= 2
  after = [next(it) for _ in range(4)]
  fresh = stream()
  resumed = train_batches(fresh, rows, 0, prefetch=2)
  resumed.set_state(state)
  again = [next(resumed) for _ in range(4)]
  for a, b in zip(after, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert min(fresh._plans) >= state["epoch"]
  assert first[0]["segments"].max() >= 2
