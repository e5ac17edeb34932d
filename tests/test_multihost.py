"""2 processes x 2 CPU devices train like 1 process x 4 devices (gloo collectives)."""

import json
import socket
import subprocess
import sys

import pytest

from jaxrec.train.checkpoint import Checkpointer

ARGS = ["--config.mesh=data:2,tensor:2", "--config.train.steps=4", "--config.train.batch_size=32",
        "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=2", "--config.eval.max_users=32",
        "--config.eval.batch_size=32", "--config.model.d_model=32", "--config.model.d_ff=64"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = free_port()
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--cpu_devices=2",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       f"--workdir={multi}", *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=420) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = tmp_path / "single"
  result = subprocess.run([sys.executable, "-m", "experiments.train", "--cpu_devices=4",
                           f"--workdir={single}", *ARGS], capture_output=True, text=True,
                          timeout=420)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(losses(multi)) == 4  # only process 0 writes metrics
  assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
  assert sorted(Checkpointer(multi / "checkpoints").all_steps()) == [2, 4]
  summary = json.loads((multi / "summary.json").read_text())
  assert summary["device"].startswith("4x")
