"""Load balancing: the partitioner is optimal, balanced pipelines match the reference,
and re-balancing mid-run keeps the state exactly."""

import itertools
import json

import numpy as np
import pytest

from jaxrec.mesh import make_mesh
from jaxrec.models.recommender import RecommenderFns
from jaxrec.parallel import balance
from jaxrec.parallel.balance import PieceCosts
from jaxrec.parallel.pipeline import Schedule, StageLayout
from tests.helpers import tiny_config
from tests.test_pipeline import check_against_reference


def brute_force(costs, n_layers, stages, pipe, head, layer_costs):
  best = None
  for cuts in itertools.combinations(range(1, n_layers), stages - 1):
    bounds = (0, *cuts, n_layers)
    counts = [bounds[i + 1] - bounds[i] for i in range(stages)]
    stage = []
    for s in range(stages):
      c = sum(layer_costs[bounds[s]:bounds[s + 1]])
      c += costs.embed if s == 0 else 0.0
      c += costs.head / pipe if head == "spread" else (costs.head if s == stages - 1 else 0.0)
      stage.append(c)
    if best is None or max(stage) < best[0] - 1e-12:
      best = (max(stage), tuple(counts))
  return best


@pytest.mark.parametrize("seed", range(12))
def test_the_dynamic_programme_is_optimal(seed):
  rng = np.random.default_rng(seed)
  n_layers = int(rng.integers(3, 10))
  stages = int(rng.integers(2, min(n_layers, 5) + 1))
  layer_costs = rng.uniform(0.5, 2.0, n_layers).tolist()
  costs = PieceCosts(0.3, 0.7, rng.uniform(0, 2), 0.1, rng.uniform(0, 10), "test")
  for head in ("last", "spread"):
    counts = balance.solve(costs, n_layers, stages, pipe=stages, head=head,
                           layer_costs=layer_costs)
    assert sum(counts) == n_layers and min(counts) >= 1
    value, _ = brute_force(costs, n_layers, stages, stages, head, layer_costs)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    got = max(sum(layer_costs[bounds[s]:bounds[s + 1]]) +
              (costs.embed if s == 0 else 0.0) +
              (costs.head / stages if head == "spread" else
               (costs.head if s == stages - 1 else 0.0)) for s in range(stages))
    assert got == pytest.approx(value, rel=1e-12)


def test_a_heavy_head_is_balanced_by_spreading_it():
  """An item head worth 100 layers: no layer split helps; spreading it does."""
  costs = PieceCosts(1.0, 2.0, 0.5, 0.5, 300.0, "test")
  uniform = balance.uniform_plan(costs, 8, 4, 1, "1f1b", 8)
  best = balance.plan(costs, 8, 4, 1, "1f1b", 8)
  assert uniform.imbalance > 2.5
  assert best.head == "spread" and best.imbalance <= 1.10
  assert best.step_time < uniform.step_time / 2


def test_predicted_step_time_counts_the_bubble():
  costs = PieceCosts(1.0, 1.0, 0.0, 0.0, 0.0, "test")
  layout = StageLayout.build(4, 4, 1)
  s = Schedule("gpipe", 4, 8)
  # unit ticks: every tick lasts one layer fwd or bwd; 2 * (m + p - 1) ticks
  assert balance.predicted_step_time(costs, s, layout) == pytest.approx(2 * (8 + 4 - 1))


@pytest.mark.slow
def test_auto_layout_trains_like_the_reference():
  config = tiny_config(**{"pipeline.microbatches": 4, "model.n_layers": 6,
                          "pipeline.layers_per_stage": "auto"})
  prog = check_against_reference(config, "pipe:4")
  assert prog.layout.balance_plan is not None
  assert sum(prog.layout.stages.layers_per_stage) == 6


@pytest.mark.slow
def test_rebalancing_mid_run_keeps_the_state_and_the_loss_curve(tmp_path):
  from experiments.configs import quickstart
  from jaxrec.train.loop import train_and_evaluate

  def config(layers, rebalance):
    c = quickstart.get_config()
    c.mesh = "pipe:2,data:4"
    c.model.n_layers = 4
    c.model.d_model = 32
    c.model.d_ff = 64
    c.model.dropout = 0.0
    c.pipeline.microbatches = 2
    c.pipeline.layers_per_stage = layers
    c.pipeline.head = "last"
    c.pipeline.rebalance_every = 3 if rebalance else 0
    c.pipeline.rebalance_threshold = 0.05
    c.train.steps = 6
    c.train.batch_size = 32
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    c.eval.max_users = 32
    c.eval.batch_size = 32
    return c

  moved = tmp_path / "moved"
  summary = train_and_evaluate(config("1,3", True), moved)
  rows = [json.loads(l) for l in (moved / "metrics.jsonl").read_text().splitlines()]
  events = [r for r in rows if "rebalanced" in r]
  assert len(events) == 1 and events[0]["step"] == 3
  assert events[0]["imbalance_after"] < events[0]["imbalance_before"]
  fixed = tmp_path / "fixed"
  train_and_evaluate(config("1,3", False), fixed)
  losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text()  # noqa
                      .splitlines() if '"lr"' in l]
  np.testing.assert_allclose(losses(moved), losses(fixed), rtol=1e-5)
  assert summary["test"]["users"] == 32


def test_timed_piece_costs_are_measured_on_the_devices():
  """`balance_costs = "timed"`: every piece is run and timed, and the head over a
  large catalogue (20k items) costs more than one small layer (fwd + bwd)."""
  config = tiny_config(**{"pipeline.microbatches": 2, "model.dropout": 0.0})
  fns = RecommenderFns.from_config(config, 20_000)
  costs = balance.measure(fns, make_mesh("pipe:2,data:4"), config, timed=True, repeats=3)
  assert costs.source.startswith("timed on")
  for name in ("layer_fwd", "layer_bwd", "embed_fwd", "embed_bwd", "head"):
    value = getattr(costs, name)
    assert 0 < value < 10, (name, value)
  assert costs.head > costs.layer, costs
