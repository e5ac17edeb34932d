import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data.sequences import EvalExamples
from jaxrec.eval.evaluator import evaluate
from jaxrec.eval.metrics import brute_force_ranks, metrics_from_ranks
from jaxrec.models.recommender import ModelConfig, RecommenderFns
from jaxrec.partitioning import tree_specs
from jaxrec.mesh import make_mesh
from tests.helpers import program, tiny_config


def test_metrics_from_ranks_by_hand():
  ranks = np.array([0, 1, 4, 9, 10, 60])
  m = metrics_from_ranks(ranks)
  assert m["hr@1"] == pytest.approx(1 / 6)
  assert m["hr@5"] == pytest.approx(3 / 6)
  assert m["hr@10"] == pytest.approx(4 / 6)
  assert m["hr@50"] == pytest.approx(5 / 6)
  ndcg10 = (1 + 1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(11)) / 6
  assert m["ndcg@10"] == pytest.approx(ndcg10)
  assert m["mrr"] == pytest.approx(np.mean(1 / (ranks + 1)))
  weighted = metrics_from_ranks(np.array([0, 100]), np.array([1.0, 0.0]))
  assert weighted["hr@1"] == 1.0 and weighted["users"] == 1


def test_brute_force_ranks_exclusion_and_ties():
  scores = np.array([[0, 5, 3, 5, 1, 9]], np.float64)  # col 0 padding; items 1..4; col 5 pad
  # target 1 (score 5) ties with item 3 -> pessimistic rank 1
  assert brute_force_ranks(scores, np.array([1]), None, 4).tolist() == [1]
  # excluding item 3 removes the tie; the target itself is never excluded
  assert brute_force_ranks(scores, np.array([1]), [np.array([3, 1])], 4).tolist() == [0]
  # a constant scorer ranks the target last
  flat = np.ones((1, 6))
  assert brute_force_ranks(flat, np.array([2]), None, 4).tolist() == [3]


def _examples(num_items, users, max_len, seed):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, num_items + 1, (users, max_len)).astype(np.int32)
  inputs[::3, :3] = 0
  target = rng.integers(1, num_items + 1, users).astype(np.int32)
  hist = [np.unique(np.concatenate([row[row > 0], rng.integers(1, num_items + 1, 5)]))
          for row in inputs]
  hist[0] = np.append(hist[0], target[0])  # a target inside the history stays a candidate
  offs = np.concatenate([[0], np.cumsum([len(h) for h in hist])])
  return EvalExamples(inputs, target, offs, np.concatenate(hist).astype(np.int32),
                      np.arange(users))


@pytest.mark.parametrize("spec", ["data:1", "data:8", "data:2,tensor:4"])
@pytest.mark.parametrize("exclude", ["history", "none", "input"])
def test_sharded_ranks_match_brute_force(spec, exclude):
  config = tiny_config(**{"eval.batch_size": 16})
  devices = 1 if spec == "data:1" else 8
  prog = program(config, spec, devices)
  params = prog.init_state(0).params
  ex = _examples(300, 37, 8, seed=1)
  got = evaluate(prog.eval_ranks, params, prog.mesh, ex, 16, exclude)
  fns = prog.fns
  p = jax.device_get(params)
  logits = np.asarray(jax.jit(lambda p, x: fns.logits(p, x, fns.context()))(p, ex.inputs))
  scores = logits[:, -1, :]
  exclude_lists = ([ex.history_of(r) for r in range(len(ex))] if exclude == "history"
                   else None)
  if exclude == "input":   # the history holds 5 more items than the window: not excluded
    exclude_lists = [row[row > 0] for row in ex.inputs]
  want = metrics_from_ranks(brute_force_ranks(scores, ex.target, exclude_lists, 300))
  for k in ("hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "users"):
    assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_top_k_merges_shards_and_skips_padding_and_history():
  cfg = ModelConfig(num_items=61, max_len=8, d_model=16, n_heads=4, n_layers=1, d_ff=32)
  fns = RecommenderFns(cfg)
  params = fns.init(jax.random.key(2))
  h = jax.random.normal(jax.random.key(3), (8, 16))
  exclude = jnp.tile(jnp.array([[5, 7, 0]]), (8, 1))
  mesh = make_mesh("data:2,tensor:4")
  specs = tree_specs(fns.logical_axes)
  from jax.sharding import PartitionSpec as P

  def local(p, h, ex):
    return fns.top_k(p, h, 70, ex, fns.context(tensor_axis="tensor"))

  ids, vals = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P("data"), P("data")),
                                    out_specs=(P("data"), P("data"))))(params, h, exclude)
  table = np.asarray(params["items"]["table"])
  assert table.shape[0] == 128  # 62 rows padded to the table multiple
  scores = np.asarray(h) @ table.T
  scores[:, 0] = -np.inf
  scores[:, 62:] = -np.inf
  scores[:, [5, 7]] = -np.inf
  want = np.argsort(-scores, axis=1)[:, :59]  # 61 items - 2 excluded
  ids = np.asarray(ids)
  np.testing.assert_array_equal(ids[:, :59], want)
  assert set(ids[:, :59].ravel()).isdisjoint({0, 5, 7}) and ids[:, :59].max() <= 61
