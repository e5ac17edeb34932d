"""experiments.reproduce's seed handling: which config each seed trains, where it runs,
and the per-row mean / spread reported over seeds (the training itself is the loop's,
tested elsewhere; the README smoke run covers the command end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import reproduce

REPO = Path(__file__).resolve().parents[1]


def test_seed_zero_keeps_the_rows_own_workdir(tmp_path):
  assert reproduce.seed_workdir(tmp_path, "hstu", 0) == tmp_path / "hstu"
  assert reproduce.seed_workdir(tmp_path, "hstu", 3) == tmp_path / "hstu-seed3"


@pytest.mark.parametrize("values", [["a"], ["-1"], ["1", "1"], []])
def test_bad_seeds_are_refused_naming_the_value(values):
  with pytest.raises(SystemExit, match="non-negative integers"):
    reproduce.parse_seeds(values)


def test_seeds_keep_their_order():
  assert reproduce.parse_seeds(["2", "0", "5"]) == [2, 0, 5]


def test_a_seed_offsets_initialisation_and_batch_order(tmp_path, monkeypatch):
  seen = []

  def fake_train(config, workdir):
    seen.append((config.seed, config.data.shuffle_seed, config.data.holdout,
                 config.train.select_on, workdir))
    return {"steps": 1}

  monkeypatch.setattr("jaxrec.train.loop.train_and_evaluate", fake_train)
  config = str(REPO / "experiments" / "configs" / "quickstart.py")
  base = reproduce.runtime.load_config(config)
  reproduce.run_row("q", config, tmp_path / "q-seed2", "test", seed=2)
  reproduce.run_row("q", config, tmp_path / "q", base.data.holdout, seed=0)
  assert seen[0] == (base.seed + 2, base.data.shuffle_seed + 2, "test", "",
                     str(tmp_path / "q-seed2"))
  assert seen[1] == (base.seed, base.data.shuffle_seed, base.data.holdout,
                     base.train.select_on, str(tmp_path / "q"))


def test_a_finished_seed_is_read_back_not_retrained(tmp_path, monkeypatch):
  monkeypatch.setattr("jaxrec.train.loop.train_and_evaluate",
                      lambda *a: pytest.fail("retrained a finished run"))
  (tmp_path / "summary.json").write_text('{"steps": 7}')
  assert reproduce.run_row("q", "unused.py", tmp_path, "test", seed=1) == {"steps": 7}


def test_data_path_replaces_every_rows_file_and_a_run_on_another_file_is_refused(
    tmp_path, monkeypatch):
  monkeypatch.setattr("jaxrec.train.loop.train_and_evaluate",
                      lambda *a: pytest.fail("retrained a finished run"))
  config = str(REPO / "experiments" / "configs" / "quickstart.py")
  assert reproduce.row_config(config, "test", data_path="x/ratings.dat").data.path == \
      "x/ratings.dat"
  own = reproduce.row_config(config, "test").data.path   # "" (the embedded dataset)
  (tmp_path / "summary.json").write_text(json.dumps({"steps": 7, "config": {"data": {"path": own}}}))
  assert reproduce.run_row("q", config, tmp_path, "test")["steps"] == 7
  with pytest.raises(SystemExit, match="read , not x/ratings.dat; give runs on another"):
    reproduce.run_row("q", config, tmp_path, "test", data_path="x/ratings.dat")
  # the same file named another way is the same file
  (tmp_path / "summary.json").write_text(
      json.dumps({"steps": 8, "config": {"data": {"path": "x/../x/ratings.dat"}}}))
  assert reproduce.run_row("q", config, tmp_path, "test", data_path="x/ratings.dat")["steps"] == 8
  with pytest.raises(SystemExit, match="read x/../x/ratings.dat, not y/ratings.dat"):
    reproduce.run_row("q", config, tmp_path, "test", data_path="y/ratings.dat")


def test_seed_summaries_give_mean_and_sample_std_per_row():
  def run(row, seed, hr, ndcg):
    return {"row": row, "seed": seed, "published": None,
            "test": {"hr@10": hr, "ndcg@10": ndcg}}
  results = [run("a", 0, 0.30, 0.16), run("a", 1, 0.28, 0.17), run("a", 2, 0.29, 0.18),
             run("b", 0, 0.10, 0.05)]
  a, b = reproduce.seed_summaries(results)
  assert a["row"] == "a" and a["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(a["hr@10_mean"], 0.29, rtol=1e-12)
  np.testing.assert_allclose(a["ndcg@10_mean"], 0.17, rtol=1e-12)
  np.testing.assert_allclose(a["ndcg@10_std"], 0.01, rtol=1e-9)   # sample std (n - 1)
  np.testing.assert_allclose(a["hr@10_std"], 0.01, rtol=1e-9)
  assert b["seeds"] == [0] and b["ndcg@10_std"] == 0.0


def test_a_run_scored_before_eval_exclude_reads_as_its_protocol():
  def scored(ev):
    return reproduce.scored_exclusion({"config": {"eval": ev}})
  assert scored({}) == "history"                                  # before any of them
  assert scored({"exclude_history": True}) == "history"          # before scopes
  assert scored({"exclude_history": True, "exclude_scope": "input"}) == "input"
  assert scored({"exclude_history": False, "exclude_scope": "input"}) == "none"
  assert scored({"exclude": "input"}) == "input"


def test_rescoring_reads_back_its_result_and_refuses_a_selected_checkpoint(tmp_path):
  (tmp_path / "test_exclude_input.json").write_text('{"step": 4, "test": {"mrr": 0.5}}')
  assert reproduce.rescore("q", "unused.py", tmp_path, "test", 0, "input",
                           {"steps": 4})["test"] == {"mrr": 0.5}
  with pytest.raises(SystemExit, match="selected on validation"):
    reproduce.rescore("q", "unused.py", tmp_path, "valid_test", 0, "history",
                      {"steps": 4, "selected": {"step": 2}})
