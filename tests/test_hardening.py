"""What a pod run needs: loud mesh errors, careful quarantine, cheap preemption checks,
a baseline that does not cost a Python loop per user, a balancer on the real device."""

import errno
import logging
import types

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils, multihost_utils

from experiments.configs import quickstart
from jaxrec import mesh as mesh_lib
from jaxrec.data import load_dataset
from jaxrec.eval.metrics import brute_force_ranks, metrics_from_ranks, popularity_metrics
from jaxrec.mesh import MeshShape, MeshSpecError, build_mesh
from jaxrec.train import checkpoint as ckpt_lib
from jaxrec.train import loop
from jaxrec.train.checkpoint import Checkpointer, CheckpointReadError
from tests.helpers import program, tiny_config


def test_mesh_falls_back_only_where_there_is_no_topology(monkeypatch, caplog):
  def refuse(*args, **kwargs):
    raise ValueError("cannot map onto the torus")

  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  with caplog.at_level(logging.WARNING):
    mesh = build_mesh(MeshShape(data=4, tensor=2))
  assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())
  assert "no topology-aware layout" in caplog.text and "cpu devices" in caplog.text
  tpus = [types.SimpleNamespace(id=i, platform="tpu", device_kind="TPU v5p", process_index=0)
          for i in range(8)]
  with pytest.raises(MeshSpecError, match="does not fit the TPU topology.*cannot map"):
    build_mesh(MeshShape(data=4, tensor=2), tpus)
  assert mesh_lib.AXES == ("replica", "data", "pipe", "tensor")


def saved_run(tmp_path):
  config = tiny_config(**{"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 0,
                          "train.eval_every": 0, "eval.max_users": 16, "eval.batch_size": 16,
                          "data.max_len": 8, "eval.baseline": "none"})
  loop.train_and_evaluate(config, tmp_path, stop_after=4)
  return config


def test_transient_read_errors_are_retried_and_never_quarantine(tmp_path, monkeypatch):
  config = saved_run(tmp_path)
  monkeypatch.setattr(ckpt_lib, "RETRY_BACKOFF_S", 0.0)
  real = ckpt_lib.ocp.CheckpointManager.restore
  failures = {"left": 2}

  def flaky(self, *args, **kwargs):
    if failures["left"] > 0:
      failures["left"] -= 1
      raise OSError(errno.EIO, "Input/output error (bucket mount)")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", flaky)
  _, _, _, prog = loop.build(config)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  state = loop.restore_latest(ckpt, prog)
  assert int(state.step) == 4 and failures["left"] == 0
  # an error that keeps coming is reported, and the checkpoints stay where they are
  failures["left"] = 10 ** 6
  with pytest.raises(CheckpointReadError, match="left in place"):
    loop.restore_latest(ckpt, prog)
  assert sorted(ckpt.all_steps()) == [2, 4]
  assert not (tmp_path / "checkpoints-unreadable").exists()
  ckpt.close()


def test_an_error_interpreting_a_readable_checkpoint_never_quarantines(tmp_path, monkeypatch):
  """The bug this pins: a checkpoint older than a config section raised
  AttributeError (from a KeyError) in our own code, and both good checkpoints of a
  3-hour run were moved aside as if their files were broken."""
  config = saved_run(tmp_path)
  _, _, _, prog = loop.build(config)

  def newer_schema(program, meta):
    try:
      return {}["embedding"]
    except KeyError as e:
      raise AttributeError("'embedding'") from e

  monkeypatch.setattr(loop.remesh, "saved_program", newer_schema)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  with pytest.raises(CheckpointReadError, match="left in place.*AttributeError|AttributeError.*left in place"):
    loop.restore_latest(ckpt, prog)
  assert sorted(ckpt.all_steps()) == [2, 4]
  assert not (tmp_path / "checkpoints-unreadable").exists()
  ckpt.close()


def test_errors_are_classified_by_what_they_prove():
  assert ckpt_lib.is_transient(OSError(errno.ETIMEDOUT, "timed out"))
  assert not ckpt_lib.is_corrupt(OSError(errno.EIO, "I/O error"))
  assert ckpt_lib.is_corrupt(FileNotFoundError("state/manifest.ocdbt"))
  assert ckpt_lib.is_corrupt(ValueError("Error reading: DATA_LOSS"))
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = TimeoutError("read timed out")
  assert ckpt_lib.is_transient(wrapped) and not ckpt_lib.is_corrupt(wrapped)
  assert not ckpt_lib.is_corrupt(RuntimeError("an unknown failure"))


def test_preemption_is_shared_every_n_steps_and_by_jax_s_sync_point(monkeypatch):
  calls = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: calls.append(1) or np.concatenate([x, x]))

  def no_service(step):
    raise RuntimeError("Preemption sync manager has not been initialized")

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no_service)
  guard = loop.PreemptionGuard(check_every=5)
  assert not any(guard.requested(step) for step in range(1, 21))
  assert len(calls) == 4
  guard.signal = 15
  assert not guard.requested(21) and guard.requested(25)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 7)
  assert loop.PreemptionGuard(check_every=5).requested(7)


@pytest.mark.parametrize("exclude", ["history", "none", "input"])
def test_vectorised_popularity_baseline_equals_the_brute_force(exclude):
  data = load_dataset(quickstart.get_config().data)
  pop = data.popularity
  examples = data.test
  scores = np.broadcast_to(pop[None].astype(np.float64), (len(examples), pop.shape[0]))
  if exclude == "input":   # only the input window (users with more history than max_len)
    assert any(len(examples.history_of(r)) > (row > 0).sum()
               for r, row in enumerate(examples.inputs))
    hist = [row[row > 0] for row in examples.inputs]
  else:
    hist = ([examples.history_of(r) for r in range(len(examples))] if exclude == "history"
            else None)
  want = metrics_from_ranks(brute_force_ranks(scores, examples.target, hist, data.num_items))
  got = popularity_metrics(pop, examples, exclude, data.num_items)
  assert got == pytest.approx(want)


def test_balancer_uses_the_running_device_and_says_so(caplog):
  """On CPU there is no published profile: an "auto" split is balanced on timed costs
  (not an H100 datasheet), and the layout records which."""
  config = tiny_config(**{"pipeline.layers_per_stage": "auto", "pipeline.microbatches": 2,
                          "model.n_layers": 4})
  assert config.pipeline.balance_costs == "device"
  with caplog.at_level(logging.INFO):
    prog = program(config, "pipe:2,data:4")
  assert prog.layout.costs_source.startswith("timed on cpu")
  assert "pipeline stage costs: timed on" in caplog.text
