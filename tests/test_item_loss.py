"""The item head at catalogue scale: real tokens only, tiled softmax, sampled softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import quickstart
from jaxrec.data import load_dataset
from jaxrec.data.batches import TrainStream
from jaxrec.models import losses
from jaxrec.mesh import make_mesh
from jaxrec.models.recommender import ModelConfig, RecommenderFns
from jaxrec.perf import hlo
from jaxrec.perf.comm import abstract_batch
from jaxrec.train import reference
from jaxrec.train.step import TrainProgram
from tests.helpers import (RTOL, global_batch, max_rel_diff, program, synthetic_batch,
                           tiny_config, tiny_fns)


def naive_ce(h, table, targets, num_items):
  """The textbook full softmax: all logits at once, padding masked afterwards."""
  logits = h @ table.T
  ids = jnp.arange(table.shape[0])
  logits = jnp.where((ids >= 1) & (ids <= num_items), logits, -1e30)
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
  return jnp.where(targets > 0, ce, 0.0).sum()


def test_compact_puts_real_targets_first_in_order_and_drops_nothing():
  t = jnp.asarray([0, 5, 0, 0, 7, 2, 0, 9])
  order, count = losses.compact(t)
  assert int(count) == 4
  assert np.asarray(t[order]).tolist() == [5, 7, 2, 9, 0, 0, 0, 0]
  assert sorted(np.asarray(order).tolist()) == list(range(8))


@pytest.mark.parametrize("tile, chunk", [(16, 8), (7, 5), (50, 64), (13, 37)])
def test_tiled_softmax_equals_the_untiled_one(tile, chunk):
  """Loss and gradients w.r.t. hidden states and table, with tiles that do not divide
  the rows (the last tile overlaps) and chunks that do not divide the tokens."""
  rng = np.random.default_rng(0)
  n, d, rows, items = 37, 8, 50, 45
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
  t = rng.integers(1, items + 1, n)
  t[::4] = 0
  t = jnp.asarray(t, jnp.int32)
  order, _ = losses.compact(t)
  spec = losses.FullSoftmax(num_items=items, axes=None, tile=tile, chunk=chunk)

  def tiled(h, table):
    return losses.full_softmax(h[order], t[order], table, spec).sum()

  want = jax.value_and_grad(lambda h, w: naive_ce(h, w, t, items), (0, 1))(h, table)
  got = jax.value_and_grad(tiled, (0, 1))(h, table)
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
  assert max_rel_diff(got[1], want[1]) < RTOL


def test_real_token_head_equals_the_masked_loss_on_the_quickstart_batch():
  """The quickstart's first batch: the compacted, chunked, tiled head gives the loss
  of the untiled softmax over every position, masked afterwards (1e-6)."""
  config = quickstart.get_config()
  data = load_dataset(config.data)
  fns = RecommenderFns.from_config(config, data.num_items)
  params = fns.init(jax.random.key(0))
  batch = TrainStream(data.train, config.train.batch_size, 0).host_batch(0, slice(None))
  ctx = fns.context(dropout_rate=0.0)
  h = fns.layers(params["layers"], fns.embed(params, batch["inputs"], ctx), batch["inputs"],
                 ctx, jnp.arange(fns.cfg.n_layers))
  total, count = jax.jit(lambda p, h: fns.head_loss(p, h, batch["targets"], ctx))(params, h)
  flat = fns.final_hidden(params, h).reshape(-1, h.shape[-1])
  want = naive_ce(flat, params["items"]["table"], jnp.asarray(batch["targets"]).reshape(-1),
                  data.num_items)
  real = int((batch["targets"] > 0).sum())
  assert int(count) == real and real < batch["targets"].size   # the batch has padding
  assert float(total) == pytest.approx(float(want), rel=1e-6)


def in_batch_numpy(h, targets, cand_ids, cand_rows, target_rows):
  """Sampled softmax with logQ correction (q = count in the candidate set) and
  accidental hits masked, one token at a time in float64."""
  counts = {i: int((cand_ids == i).sum()) for i in set(cand_ids.tolist())}
  total = 0.0
  for n in range(h.shape[0]):
    if targets[n] == 0:
      continue
    pos = h[n] @ target_rows[n] - np.log(max(counts.get(int(targets[n]), 0), 1e-30))
    negs = [h[n] @ cand_rows[k] - np.log(counts[int(cand_ids[k])])
            for k in range(cand_ids.shape[0])
            if cand_ids[k] > 0 and cand_ids[k] != targets[n]]
    logits = np.asarray([pos] + negs, np.float64)
    total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - pos
  return total


def sampled(h, targets, rows, cfg, shared=None, log_q=None, hits=None, draw=None):
  n = targets.shape[0]
  negatives = losses.Negatives(shared=shared, draw=draw, log_q=log_q, hits=hits)
  return losses.sampled_softmax(h, targets, rows, jnp.zeros((n, 2), jnp.uint32),
                                jnp.arange(n), negatives, cfg)


def test_logq_corrected_in_batch_loss_matches_numpy():
  rng = np.random.default_rng(1)
  n, d, items = 24, 6, 10
  table = rng.normal(size=(items + 1, d)).astype(np.float32)
  targets = rng.integers(1, items + 1, n).astype(np.int32)   # repeats: popular items
  targets[[3, 9]] = 0
  h = rng.normal(size=(n, d)).astype(np.float32)
  cfg = losses.LossConfig(type="sampled", negatives="in_batch", token_chunk=7)
  ids = jnp.asarray(targets)
  rows = jnp.asarray(table)[ids]
  got = sampled(jnp.asarray(h), ids, rows, cfg, shared=losses.Candidates(ids, rows),
                log_q=losses.in_batch_log_q(ids, 0, items)).sum()
  want = in_batch_numpy(h.astype(np.float64), targets, targets, table[targets].astype(np.float64),
                        table[targets].astype(np.float64))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_accidental_hits_never_contribute():
  """A candidate equal to the token's target (or, with history masking, in its own
  sequence) changes neither the loss nor its gradient, whatever its row holds."""
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  targets = jnp.asarray([3, 3, 4, 1])
  rows = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  cfg = losses.LossConfig(type="sampled", logq_correction=False)
  ids = jnp.asarray([7, 3, 9])          # candidate 1 hits the target of tokens 0 and 1

  def per_token(cand_rows, hits=None):
    return sampled(h, targets, rows, cfg, shared=losses.Candidates(ids, cand_rows), hits=hits)

  base = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  moved = base.at[1].set(100.0)
  np.testing.assert_allclose(per_token(base)[:2], per_token(moved)[:2], rtol=1e-6)
  assert not np.allclose(per_token(base)[2:], per_token(moved)[2:])   # tokens 2, 3 use it
  # history hits: masking candidate 1 for every token makes it irrelevant everywhere
  every = lambda pos, cand: jnp.broadcast_to(cand[None] == 3, (pos.shape[0], 3))  # noqa: E731
  np.testing.assert_allclose(per_token(base, every), per_token(moved, every), rtol=1e-6)
  grad = jax.grad(lambda r: per_token(r, every).sum())(base)
  np.testing.assert_allclose(np.asarray(grad)[1], 0.0)


def test_sampled_softmax_over_every_item_is_the_full_softmax():
  rng = np.random.default_rng(3)
  n, d, items = 20, 6, 30
  table = jnp.asarray(rng.normal(size=(items + 1, d)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  t = jnp.asarray(rng.integers(0, items + 1, n), jnp.int32)
  all_items = jnp.arange(1, items + 1)
  cfg = losses.LossConfig(type="sampled", logq_correction=False, token_chunk=8)

  def loss(h, table):
    return sampled(h, t, table[t], cfg,
                   shared=losses.Candidates(all_items, table[all_items])).sum()

  want = jax.value_and_grad(lambda h, w: naive_ce(h, w, t, items), (0, 1))(h, table)
  got = jax.value_and_grad(loss, (0, 1))(h, table)
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
  assert max_rel_diff(got[1], want[1]) < RTOL


def test_per_token_negatives_differ_per_token_and_are_reproducible():
  """HSTU's recipe: K uniform negatives per token, drawn from the token's own key."""
  config = tiny_config(**{"loss.type": "sampled", "loss.num_negatives": 16})
  fns = tiny_fns(config)
  params = fns.init(jax.random.key(0))
  ctx = fns.context(dropout_rate=0.0, loss_key=jax.random.key(5))
  targets = jnp.asarray([3, 4, 5, 6])
  negs = fns.negatives(params, targets, fns.lookup(params, targets, ctx), ctx, None)
  keys = fns.token_keys(ctx, None, jnp.arange(4), 4)
  ids, rows = negs.draw(keys)
  assert ids.shape == (4, 16) and rows.shape == (4, 16, config.model.d_model)
  assert not np.array_equal(np.asarray(ids[0]), np.asarray(ids[1]))
  np.testing.assert_array_equal(ids, negs.draw(fns.token_keys(ctx, None, jnp.arange(4), 4))[0])


def check_program(config, spec, devices=8):
  prog = program(config, spec, devices)
  state = prog.init_state(0)
  params = dict(jax.device_get(state.params))
  params["layers"] = jax.device_get(prog.layout.stages.to_canonical(params["layers"]))
  host = synthetic_batch(5)
  loss, grads = prog.loss_and_grads(state, global_batch(prog, host))
  grads = dict(jax.device_get(grads))
  grads["layers"] = jax.device_get(prog.layout.stages.to_canonical(grads["layers"]))
  ref_loss, ref_grads = reference.loss_and_grads(prog.fns, params, host,
                                                 rng=jax.device_get(state.rng), step=0)
  assert float(loss) == pytest.approx(float(ref_loss), rel=RTOL)
  assert max_rel_diff(grads, ref_grads) < RTOL


SAMPLED = {"loss.type": "sampled", "loss.num_negatives": 64, "loss.token_chunk": 16}


@pytest.mark.parametrize("spec, overrides", [
    ("data:8", {**SAMPLED}),                         # per-token negatives: same on every mesh
    ("data:4,tensor:2", {**SAMPLED, "loss.shared_negatives": True}),
    pytest.param("data:2,tensor:4", {**SAMPLED, "loss.negatives": "mixed", "loss.l2_norm": True,
                                     "loss.temperature": 0.05, "loss.mask_history": True},
                 marks=pytest.mark.slow),
    pytest.param("data:2,pipe:2,tensor:2", {**SAMPLED, "loss.negatives": "in_batch",
                                            "pipeline.schedule": "1f1b",
                                            "pipeline.microbatches": 1},
                 marks=pytest.mark.slow),
])
def test_sampled_softmax_on_meshes_matches_the_reference(spec, overrides):
  check_program(tiny_config(**overrides), spec)


def compiled_temp_bytes(num_items: int, **overrides) -> tuple[int, RecommenderFns]:
  """Temp memory of the compiled 1-device step (16 rows x 50 positions), compile-only."""
  config = tiny_config(**{"train.batch_size": 16, "data.max_len": 50, "model.dropout": 0.0,
                          **overrides})
  fns = RecommenderFns(ModelConfig.from_config(config.model, num_items, 50),
                       losses.LossConfig.from_config(config.loss))
  prog = TrainProgram(config, fns, make_mesh("data:1", jax.devices()[:1]))
  compiled = prog.jitted_train_step().lower(prog.abstract_state(), abstract_batch(prog)).compile()
  return hlo.memory_stats(compiled)["temp_size_in_bytes"], fns


def test_tiled_head_needs_a_tenth_of_the_untiled_heads_memory():
  """Compile-only, a 1M-item table: the step's temp memory with the auto tile vs one
  tile spanning the whole table and one chunk spanning every token (the untiled
  head: [tokens, items] logits at once)."""
  tiled, _ = compiled_temp_bytes(1_000_000, **{"loss.item_tile": 0, "loss.token_chunk": 1024})
  untiled, _ = compiled_temp_bytes(1_000_000, **{"loss.item_tile": 1 << 20,
                                                 "loss.token_chunk": 800})
  assert tiled * 10 <= untiled, (tiled, untiled)


def test_sampled_head_memory_does_not_grow_with_the_chunk_count():
  """Compile-only, a 500k-item table: walking the targets in 16 chunks keeps no
  table-sized buffer per chunk for the backward (the table's rows are gathered inside
  the chunk loop; before the fix every chunk stacked a copy of it)."""
  one, fns = compiled_temp_bytes(500_000, **{**SAMPLED, "loss.token_chunk": 800})
  sixteen, _ = compiled_temp_bytes(500_000, **{**SAMPLED, "loss.token_chunk": 50})
  table_bytes = fns.cfg.table_rows * fns.cfg.d_model * 4
  assert sixteen < one + table_bytes, (one, sixteen, table_bytes)
