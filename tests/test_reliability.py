"""Nothing a user trained is lost: preemption, hard kills, corrupt checkpoints,
restores onto other meshes, non-finite steps, and clear errors at the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from jaxrec.train import loop
from jaxrec.train.checkpoint import Checkpointer, KILL_DURING_SAVE
from jaxrec.train.loop import NonFiniteTrainingError, train_and_evaluate
from tests.helpers import global_batch, program, synthetic_batch, tiny_config

CLI = [sys.executable, "-m", "experiments.train", "--cpu_devices=8", "--config.mesh=data:8",
       "--config.train.batch_size=32", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.eval.max_users=32",
       "--config.eval.batch_size=32", "--config.model.d_model=32", "--config.model.d_ff=64",
       "--config.train.steps=16"]


def losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r and "skipped" not in r}


def run_cli(workdir, *extra, env=None, wait=True):
  proc = subprocess.Popen([*CLI, f"--workdir={workdir}", *extra], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})
  if wait:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err
  return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  rc, _, err = run_cli(workdir, "--config.train.checkpoint_every=0")
  assert rc == 0, err[-2000:]
  return losses(workdir)


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, uninterrupted):
  proc = run_cli(tmp_path, "--config.train.checkpoint_every=0", wait=False)
  deadline = time.time() + 300
  while time.time() < deadline:
    if (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 4:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped early" in out
  stopped = max(losses(tmp_path))
  assert 4 <= stopped < 16
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == stopped
  rc, _, err = run_cli(tmp_path, "--config.train.checkpoint_every=0")
  assert rc == 0, err[-2000:]
  assert losses(tmp_path) == uninterrupted


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
  rc, _, _ = run_cli(tmp_path, "--config.train.checkpoint_every=4",
                     env={KILL_DURING_SAVE: "8"})
  assert rc == -signal.SIGKILL
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
  rc, _, err = run_cli(tmp_path, "--config.train.checkpoint_every=4")
  assert rc == 0, err[-2000:]
  assert losses(tmp_path) == uninterrupted


def small(steps=8, **overrides):
  c = quickstart.get_config()
  c.mesh = "data:8"
  c.train.steps = steps
  c.train.batch_size = 32
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 4
  c.eval.max_users = 32
  c.eval.batch_size = 32
  c.model.d_model = 32
  c.model.d_ff = 64
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  full = tmp_path / "full"
  train_and_evaluate(small(12), full)
  cut = tmp_path / "cut"
  train_and_evaluate(small(12), cut, stop_after=8)
  ckpt_dir = cut / "checkpoints"
  assert sorted(Checkpointer(ckpt_dir).all_steps()) == [4, 8]
  for path in (ckpt_dir / "8" / "state").rglob("*"):
    if path.is_file() and "metadata" not in path.name:
      path.write_bytes(b"corrupt")
  summary = train_and_evaluate(small(12), cut)
  assert summary["resumed_from_step"] == 4
  assert losses(cut) == losses(full)


def canonical_params(prog, state):
  params = dict(jax.device_get(state.params))
  params["layers"] = jax.device_get(prog.layout.stages.to_canonical(params["layers"]))
  return params


def canonical_mu(prog, state):
  mu = dict(jax.device_get(state.opt_state[0].mu))
  mu["layers"] = jax.device_get(prog.layout.stages.to_canonical(mu["layers"]))
  return mu


def trees_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("first, second, overrides", [
    ("data:8", "data:2,pipe:2,tensor:2", {}),
    pytest.param("data:2,pipe:2,tensor:2", "data:8", {}, marks=pytest.mark.slow),
    pytest.param("data:8", "pipe:2,data:4",
                 {"model.n_layers": 3, "pipeline.layers_per_stage": "2,1",
                  "compression.method": "int8", "compression.min_size": 256},
                 marks=pytest.mark.slow),
])
def test_restore_onto_another_mesh_keeps_params_and_optimizer_exactly(tmp_path, first, second,
                                                                      overrides):
  config = tiny_config(**{"pipeline.microbatches": 2, **overrides})
  config.mesh = first
  a = program(config, first)
  state = a.init_state(0)
  for step in range(2):
    state, _ = a.train_step(state, global_batch(a, synthetic_batch(step)))
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(2, state, loop.checkpoint_meta(a, 2))
  ckpt.wait()
  b = program(config, second)
  restored = loop.restore(ckpt, 2, b)
  assert int(restored.step) == 2
  assert trees_equal(canonical_params(b, restored), canonical_params(a, state))
  assert trees_equal(canonical_mu(b, restored), canonical_mu(a, state))
  # and it trains on from there, on the new mesh
  restored, m = b.train_step(restored, global_batch(b, synthetic_batch(2)))
  assert np.isfinite(float(m["loss"]))


def test_a_non_finite_step_changes_nothing_but_the_step():
  config = tiny_config(**{"train.inject_nonfinite_steps": "1",
                          "compression.method": "topk", "compression.min_size": 256})
  prog = program(config, "data:8")
  state = prog.init_state(0)
  state, m0 = prog.train_step(state, global_batch(prog, synthetic_batch(0)))
  before = jax.device_get(state)
  state, m1 = prog.train_step(state, global_batch(prog, synthetic_batch(1)))
  after = jax.device_get(state)
  assert int(m0["skipped"]) == 0 and int(m1["skipped"]) == 1
  assert not np.isfinite(float(m1["loss"]))
  assert int(after.step) == int(before.step) + 1
  for part in ("params", "opt_state", "comp_state", "dp_state"):
    assert trees_equal(getattr(after, part), getattr(before, part)), part
  state, m2 = prog.train_step(state, global_batch(prog, synthetic_batch(2)))
  assert int(m2["skipped"]) == 0 and np.isfinite(float(m2["loss"]))


@pytest.mark.slow
def test_too_many_non_finite_steps_stop_with_the_good_checkpoint_intact(tmp_path):
  config = small(12, **{"train.inject_nonfinite_steps": "5,6,7",
                        "train.max_nonfinite_steps": 3})
  with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps"):
    train_and_evaluate(config, tmp_path)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 4
  skipped = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"skipped": 1' in l]
  assert [r["step"] for r in skipped] == [6, 7, 8]


@pytest.mark.parametrize("args, needle", [
    (["--config.data.path=/no/such/ratings.csv"], "dataset file '/no/such/ratings.csv' does not exist"),
    (["--config.mesh=data:3"], "mesh 'data:3' has 3 devices"),
    (["--config.train.batch_size=12"], "batch_size = 12 is not divisible"),
])
def test_bad_input_at_the_command_line_is_one_clear_line(tmp_path, args, needle):
  rc, _, err = run_cli(tmp_path, *args)
  assert rc == 2
  assert needle in err
  assert "Traceback" not in err


@pytest.mark.slow
def test_soak_1000_steps_with_random_preemptions(tmp_path):
  """1,000 steps on 8 fake devices, stopped at random points and resumed, end in
  exactly the state of an uninterrupted run."""
  def config():
    c = tiny_config(**{"train.steps": 1000, "train.log_every": 50, "train.eval_every": 0,
                       "train.checkpoint_every": 97, "eval.max_users": 32,
                       "eval.batch_size": 32, "compression.method": "int8",
                       "compression.min_size": 256})
    c.mesh = "data:8"
    return c
  full = tmp_path / "full"
  train_and_evaluate(config(), full)
  cut = tmp_path / "cut"
  rng = np.random.default_rng(0)
  stops = sorted(rng.choice(np.arange(10, 990), size=6, replace=False).tolist())
  for stop in stops:
    assert train_and_evaluate(config(), cut, stop_after=stop) is None
  train_and_evaluate(config(), cut)
  a = Checkpointer(full / "checkpoints")
  b = Checkpointer(cut / "checkpoints")
  _, _, _, prog = loop.build(config())     # the program the runs trained: dataset-sized table
  sa = loop.restore(a, 1000, prog)
  sb = loop.restore(b, 1000, prog)
  assert trees_equal(jax.device_get(sa), jax.device_get(sb))
  shutil.rmtree(tmp_path)
