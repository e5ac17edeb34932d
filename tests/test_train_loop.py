"""End to end: the quickstart path, metrics files, exact resume, checkpoint mismatch."""

import json
import shutil
import subprocess
import sys

import pytest

from jaxrec.config import ConfigError
from jaxrec.train.checkpoint import CheckpointMismatchError
from jaxrec.train.loop import evaluate_checkpoint, train_and_evaluate
from experiments.configs import quickstart
from tests.helpers import tiny_config

EVAL_KEYS = {"step", "split", "hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10",
             "ndcg@20", "mrr"}
LOG_KEYS = {"step", "loss", "lr", "step_time_s", "tokens_per_sec"}


def small(config, **kw):
  config.train.steps = kw.get("steps", 6)
  config.train.log_every = 1
  config.train.eval_every = kw.get("eval_every", 0)
  config.train.checkpoint_every = kw.get("checkpoint_every", 3)
  config.train.batch_size = 32
  config.eval.max_users = 64
  config.eval.batch_size = 32
  config.model.d_model = 32
  config.model.d_ff = 64
  config.mesh = kw.get("mesh", "data:8")
  return config


def losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_quickstart_end_to_end_writes_metrics_and_summary(tmp_path):
  config = small(quickstart.get_config(), eval_every=3)
  summary = train_and_evaluate(config, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logs = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "split" in r]
  assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
  assert all(LOG_KEYS <= set(r) for r in logs)
  assert {(r["step"], r["split"]) for r in evals} == {(3, "valid"), (6, "valid"), (6, "test")}
  assert all(EVAL_KEYS <= set(r) for r in evals)
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["test"]["users"] == 64 and "ndcg@10" in saved["test"]
  assert saved["config"]["train"]["steps"] == 6 and saved["wall_time_s"] > 0
  assert "full ranking" in saved["protocol"]
  assert summary["test"]["hr@10"] == saved["test"]["hr@10"]


@pytest.mark.parametrize("strategy", [
    {},
    # compressor error feedback + DGC momentum, and async-mode replicas + outer momentum
    pytest.param({"compression.method": "topk", "compression.momentum": 0.9,
                  "compression.min_size": 512}, marks=pytest.mark.slow),
    pytest.param({"compression.method": "int8", "dp.mode": "diloco", "dp.sync_every": 3},
                 marks=pytest.mark.slow),
    # packed rows: the grain iterator's state (epoch start) comes back from the checkpoint
    pytest.param({"data.packing": "greedy", "data.window_stride": 0}, marks=pytest.mark.slow),
    # the rows-sharded table's sparse optimizers: their row state comes back exactly
    pytest.param({"embedding.sharding": "rows", "embedding.optimizer": "lazy_adam"},
                 marks=pytest.mark.slow),
    pytest.param({"embedding.sharding": "rows", "embedding.optimizer": "rowwise_adagrad"},
                 marks=pytest.mark.slow),
])
def test_resume_continues_with_exactly_the_uninterrupted_losses(tmp_path, strategy):
  def config():
    c = small(quickstart.get_config())
    for key, value in strategy.items():
      section, field = key.split(".")
      c[section][field] = value
    return c

  full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
  train_and_evaluate(config(), full_dir)
  assert train_and_evaluate(config(), cut_dir, stop_after=4) is None
  assert max(losses(cut_dir)) == 4
  train_and_evaluate(config(), cut_dir)
  assert losses(cut_dir) == losses(full_dir)


def test_a_resumed_run_reports_the_wall_time_of_every_segment(tmp_path):
  """The summary's total_wall_s adds the wall time saved with the checkpoint a run
  resumed from to this process's own; a checkpoint written before that was recorded
  gives None rather than a wall that silently covers only the last segment."""
  def config():
    return small(quickstart.get_config(), steps=6, checkpoint_every=0)

  cut = tmp_path / "cut"
  assert train_and_evaluate(config(), cut, stop_after=4) is None
  meta_file = cut / "checkpoints" / "4" / "meta" / "metadata"   # orbax's JsonSave file
  saved_wall = json.loads(meta_file.read_text())["wall_s"]
  assert saved_wall > 0
  old = tmp_path / "old"
  shutil.copytree(cut, old)
  old_meta = old / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(old_meta.read_text())
  del meta["wall_s"]
  old_meta.write_text(json.dumps(meta))

  summary = train_and_evaluate(config(), cut)
  assert summary["resumed_from_step"] == 4
  assert summary["total_wall_s"] == pytest.approx(saved_wall + summary["wall_time_s"], abs=0.1)
  assert train_and_evaluate(config(), old)["total_wall_s"] is None
  fresh = train_and_evaluate(config(), tmp_path / "fresh")
  assert fresh["total_wall_s"] == pytest.approx(fresh["wall_time_s"], abs=0.1)


def test_checkpoint_from_another_model_is_refused(tmp_path):
  train_and_evaluate(small(quickstart.get_config(), steps=2, checkpoint_every=0), tmp_path)
  other = small(quickstart.get_config(), steps=4)
  other.model.d_ff = 128
  with pytest.raises(CheckpointMismatchError, match=r"\['mlp'\]\['w_in'\] has shape \[2, 32, 64\] "
                     r"in the checkpoint but \[2, 32, 128\] in the current model"):
    train_and_evaluate(other, tmp_path)


def test_a_checkpoint_older_than_the_schema_still_resumes(tmp_path):
  """A run written before a config section existed (here: no `embedding`, no
  model.position_origin — the behaviour then was positions counted from the end — and
  eval.exclude_history / exclude_scope for eval.exclude) resumes; resuming it with today's default origin is refused by name."""
  def config(steps, origin):
    c = small(quickstart.get_config(), steps=steps, checkpoint_every=2)
    c.model.position_origin = origin
    return c

  train_and_evaluate(config(2, "end"), tmp_path)
  meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"   # orbax's JsonSave file
  meta = json.loads(meta_file.read_text())
  saved = json.loads(meta["config"])
  del saved["embedding"], saved["model"]["position_origin"]
  del saved["eval"]["exclude"]   # before eval.exclude: a bool and a scope
  saved["eval"].update(exclude_history=True, exclude_scope="history")
  meta["config"] = json.dumps(saved)
  meta_file.write_text(json.dumps(meta))

  with pytest.raises(CheckpointMismatchError, match="position_origin = 'end'"):
    train_and_evaluate(config(4, "start"), tmp_path)
  train_and_evaluate(config(4, "end"), tmp_path)
  assert max(losses(tmp_path)) == 4


@pytest.mark.slow
def test_resuming_with_another_recipe_says_so(tmp_path, monkeypatch):
  """A run resumed with a different training recipe (here local_sgd's outer step and
  the learning rate) continues (the params mean the same), and one warning names each
  changed field with the checkpoint's value and the run's; a longer run alone (what
  resuming is for) says nothing."""
  from absl import logging as absl_logging
  warnings = []
  monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))

  def config(steps, outer, lr=1e-3):
    c = small(quickstart.get_config(), steps=steps, checkpoint_every=2)
    c.dp.mode, c.dp.sync_every, c.dp.local_sgd_step = "local_sgd", 2, outer
    c.train.lr = lr
    return c

  train_and_evaluate(config(2, "mean"), tmp_path)
  train_and_evaluate(config(4, "mean"), tmp_path)
  assert not any("another recipe" in w for w in warnings), warnings
  train_and_evaluate(config(6, "sqrt_replicas", lr=2e-3), tmp_path)
  assert max(losses(tmp_path)) == 6
  said = [w for w in warnings if "another recipe" in w]
  assert len(said) == 1, warnings
  assert "dp.local_sgd_step: 'mean' -> 'sqrt_replicas'" in said[0], said
  assert "train.lr: 0.001 -> 0.002" in said[0] and "train.steps" not in said[0], said


@pytest.mark.slow
def test_train_command_line_runs(tmp_path):
  cmd = [sys.executable, "-m", "experiments.train", "--cpu_devices=8",
         "--config.mesh=data:4,tensor:2", "--config.train.steps=3",
         "--config.train.log_every=1", "--config.eval.max_users=32",
         "--config.eval.batch_size=32", "--config.train.batch_size=32",
         f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout[result.stdout.index("{"):])
  assert set(out["test"]) >= {"hr@10", "ndcg@10", "mrr"}
  assert "step 3/3" in result.stderr


def test_holdout_test_evaluates_the_test_split_and_selects_nothing(tmp_path):
  """The published runs' split: no validation evaluations, the periodic evaluations
  read the test split, the last step is reported, and selecting on validation is a
  config error."""
  overrides = {"data.max_len": 16, "train.steps": 4, "train.eval_every": 2,
               "train.checkpoint_every": 4, "train.log_every": 0, "eval.max_users": 32,
               "eval.batch_size": 16, "data.holdout": "test"}
  with pytest.raises(ConfigError, match="select_on = 'ndcg@10' selects on the validation"):
    train_and_evaluate(tiny_config(**overrides, **{"train.select_on": "ndcg@10"}), tmp_path)
  summary = train_and_evaluate(tiny_config(**overrides), tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in rows if "split" in r] == [(2, "test"), (4, "test")]
  assert summary["valid"] is None and summary["selected"] is None
  assert "trained through the validation item" in summary["protocol"]
  # re-scored from the last checkpoint: the same metrics under the same protocol; with
  # only the input window excluded (every user here has more history than 16 items)
  # each target can only rank lower
  config = tiny_config(**overrides)
  again = evaluate_checkpoint(config, tmp_path)
  assert again["step"] == 4
  assert again["test"] == pytest.approx(
      {**summary["test"], "eval_time_s": again["test"]["eval_time_s"]})
  window = evaluate_checkpoint(tiny_config(**overrides, **{"eval.exclude": "input"}),
                               tmp_path)
  assert "input window" in window["protocol"]
  assert window["test"]["mrr"] < summary["test"]["mrr"]
  assert all(window["test"][k] <= summary["test"][k] for k in ("hr@10", "ndcg@10", "hr@50"))
  # the most-popular baseline is scored under the same protocol, and only when asked for
  assert again["baseline_most_popular_test"] == pytest.approx(summary["baseline_most_popular_test"])
  assert window["baseline_most_popular_test"]["mrr"] < again["baseline_most_popular_test"]["mrr"]
  none = evaluate_checkpoint(tiny_config(**overrides, **{"eval.baseline": "none"}), tmp_path)
  assert none["baseline_most_popular_test"] is None


def test_select_on_reports_the_test_metrics_of_the_best_validation_step(tmp_path):
  c = tiny_config(**{"data.max_len": 16, "train.steps": 8, "train.eval_every": 2,
                     "train.checkpoint_every": 4, "train.log_every": 0,
                     "train.select_on": "ndcg@10", "eval.max_users": 48,
                     "eval.batch_size": 16, "train.lr": 5e-3})
  summary = train_and_evaluate(c, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  valid = {r["step"]: r["ndcg@10"] for r in rows if r.get("split") == "valid"}
  best = max(valid, key=lambda s: (valid[s], -s))
  assert sorted(valid) == [2, 4, 6, 8]
  assert summary["selected"]["step"] == best
  assert summary["valid"]["ndcg@10"] == pytest.approx(valid[best])
  assert summary["final"]["step"] == 8
  if best != 8:
    selected_test = [r for r in rows if r.get("split") == "test" and r.get("selected")]
    assert selected_test and selected_test[0]["ndcg@10"] == pytest.approx(summary["test"]["ndcg@10"])
