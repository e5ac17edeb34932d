"""Every `python -m experiments...` command in the README runs, as a smoke run.

The commands are read from the README's bash blocks (continuation lines joined), run in
order (two at a time where they share no path) in a sandbox whose `../shared/data` holds
small generated files in the formats the configs read, with `/path/to/...` placeholders
pointed at them and JAXREC_SMALL=1 (every experiment shrinks its model, data and steps).
`experiments.serve` is started, asked the README's `curl` requests, and stopped. Shell
lines (pip, pytest, launch scripts, gcloud, SLURM) are not run here:
tests/test_launch.py covers the launch scripts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
  """Command lines of the README's bash blocks, continuations joined, comments dropped."""
  text = (REPO / "README.md").read_text()
  lines = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = block.replace("\\\n", " ")
    for line in joined.splitlines():
      line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
      if line:
        lines.append(" ".join(line.split()))
  return lines


def write_sasrec(path: Path, users: int, items: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for u in range(1, users + 1):
      for i in rng.integers(1, items + 1, int(rng.integers(5, 30))):
        f.write(f"{u} {i}\n")


def write_ratings_dat(path: Path, users: int, items: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for u in range(1, users + 1):
      t = 978300000
      for i in rng.integers(1, items + 1, int(rng.integers(5, 30))):
        t += int(rng.integers(1, 5000))
        f.write(f"{u}::{i}::{int(rng.integers(1, 6))}::{t}\n")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme")
  work = root / "work"
  work.mkdir()
  for name in ("experiments", "jaxrec", "launch", "notebooks", "README.md"):
    (work / name).symlink_to(REPO / name)
  data = root / "shared" / "data"
  write_sasrec(data / "ml-1m" / "ml-1m.txt", 120, 300, 0)
  write_sasrec(data / "amazon-video" / "Video.txt", 150, 400, 1)
  write_ratings_dat(root / "placeholders" / "ratings.dat", 120, 300, 2)
  env = {**os.environ, "JAXREC_SMALL": "1", "PYTHONPATH": str(REPO)}
  env.pop("XLA_FLAGS", None)   # the commands fake their own devices (--cpu_devices)
  substitutions = {
      "/path/to/ml-1m/ratings.dat": str(root / "placeholders" / "ratings.dat"),
      "/path/to/ml-1m.txt": str(data / "ml-1m" / "ml-1m.txt"),
      "/path/to/Video.txt": str(data / "amazon-video" / "Video.txt"),
      "/data/": str(root / "prepared") + "/",
  }
  return work, env, substitutions


def substitute(command: str, substitutions: dict[str, str]) -> str:
  """Placeholders replaced where a path starts (after '=' or a space), so a
  replacement is never itself rewritten."""
  for old, new in substitutions.items():
    command = re.sub(r"(?<=[= ])" + re.escape(old), lambda _, new=new: new, command)
  return command


def test_the_readme_names_its_commands():
  commands = [c for c in readme_commands() if c.startswith("python -m experiments.")]
  assert len(commands) >= 15, commands
  assert any(c.startswith("python -m experiments.serve ") for c in commands)


def readme_jobs(lines: list[str], substitutions: dict[str, str]) -> list[tuple[str, list[str]]]:
  """(experiment command, the `curl` lines that ask it) in README order, placeholders
  substituted; the quick start's `pip install ... &&` is already done here."""
  jobs = []
  i = 0
  while i < len(lines):
    line = substitute(lines[i], substitutions)
    i += 1
    if line.startswith("pip install") and "&& python -m experiments." in line:
      line = line.split("&& ", 1)[1]
    if not line.startswith("python -m experiments."):
      continue
    curls = []
    if line.startswith("python -m experiments.serve "):
      while i < len(lines) and lines[i].startswith("curl "):
        curls.append(lines[i])
        i += 1
    jobs.append((line, curls))
  return jobs


PATH_FLAGS = ("workdir", "output", "out", "root", "input", "config.data.path")


def path_args(command: str) -> set[str]:
  """The files and folders a command reads or writes (its path flags, and the quick
  start's default workdir for a train command that names none)."""
  args = dict(a[2:].split("=", 1) for a in shlex.split(command)[3:]
              if a.startswith("--") and "=" in a)
  values = {args[k] for k in PATH_FLAGS if k in args}
  if command.split()[2] == "experiments.train" and "workdir" not in args:
    values.add("runs/quickstart")
  return values


def test_every_readme_experiment_command_runs(sandbox):
  """Two commands at a time (each is mostly one compiling thread; CI has 2 cores). A
  command waits for every earlier one that shares a path argument with it (the serving
  commands for the quick start's run, the prepared-data training for prepare_data)."""
  work, env, subs = sandbox
  jobs = readme_jobs(readme_commands(), subs)
  done = [threading.Event() for _ in jobs]

  def run(index: int) -> list[str]:
    line, curls = jobs[index]
    for earlier in range(index):
      if path_args(jobs[earlier][0]) & path_args(line):
        done[earlier].wait()
    try:
      if line.startswith("python -m experiments.serve "):
        return serve_and_ask(line, curls, work, env)
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=work, env=env,
                            capture_output=True, text=True, timeout=900)
      print(f"{time.perf_counter() - start:6.1f}s  rc={proc.returncode}  {line}")
      if proc.returncode != 0:
        return [f"{line}\n--- exit {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"]
      return []
    finally:
      done[index].set()

  # workers take jobs in order, so every job a running one waits for has started
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    failures = [f for result in pool.map(run, range(len(jobs))) for f in result]
  assert len(jobs) >= 15, jobs
  assert not failures, "\n\n".join(failures)


def serve_and_ask(line: str, curls: list[str], work: Path, env: dict) -> list[str]:
  port = free_port()
  args = [a if not a.startswith("--port=") else f"--port={port}" for a in shlex.split(line)[1:]]
  proc = subprocess.Popen([sys.executable, *args], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  failures = []
  try:
    listening = proc.stdout.readline()       # the JSON line printed once compiled
    if "listening" not in listening:
      return [f"{line}\n--- did not start; stderr tail:\n{proc.stderr.read()[-3000:]}"]
    for curl in curls:
      body = re.search(r"-d '(.*)'", curl).group(1)
      request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend",
                                       data=body.encode(), method="POST")
      with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
      k = json.loads(body)["k"]
      if len(answer.get("items", [])) != k:
        failures.append(f"{curl}\n--- answered {answer}")
  except Exception as e:  # noqa: BLE001 - every failure is reported with its command
    failures.append(f"{line} / {curls}\n--- {type(e).__name__}: {e}")
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  return failures
