"""The notebooks run end to end (small mode) and are stored without outputs.

Each notebook is executed in a fresh ipykernel of this interpreter with
JAXREC_NOTEBOOK_SMALL=1 (a tiny model and a few steps), then its printed results
are checked: finite losses, bubbles equal to theory, the pipelined run equal to
the 1-device reference, compressors sending fewer bytes.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_small_mesh_exploration", "02_pipeline_schedules", "03_gradient_compression"]
CELL_TIMEOUT_S = 300


def test_the_three_notebooks_exist():
  assert [p.stem for p in NOTEBOOKS] == NAMES


def path_of(name: str) -> Path:
  return ROOT / "notebooks" / f"{name}.ipynb"


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_colab_ready(name):
  nb = nbformat.read(path_of(name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name}: clear the outputs before committing (cell {cell.get('id')})")
    assert not cell.metadata.get("execution"), f"{name}: execution timings stored"
  first = nb.cells[0]
  assert first.cell_type == "code"
  for needle in ("google.colab", "REPO_URL", "JAXREC_NOTEBOOK_SMALL",
                 "--xla_force_host_platform_device_count=8", "jax_num_cpu_devices",
                 "--xla_cpu_collective_timeout_seconds"):
    assert needle in first.source, f"{name}: setup cell lacks {needle}"
  # The device flags must be set before jax is imported.
  assert first.source.index("XLA_FLAGS") < re.search(r"^ *import jax$", first.source, re.M).start()
  assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A `python3` kernelspec that runs this very interpreter (the venv's), first on
  JUPYTER_PATH, and small mode for the notebooks."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (jaxrec tests)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JAXREC_NOTEBOOK_SMALL", "1")


def execute(name: str):
  import nbclient
  nb = nbformat.read(path_of(name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  return nb


def stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs if out.output_type == "stream")


def display_types(nb) -> list[str]:
  return [mime for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
          if out.output_type in ("display_data", "execute_result") for mime in out["data"]]


def check_small_mesh(nb, text):
  assert "small mode: True" in text  # the kernel saw the env var
  losses = [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)", text, re.M)]
  assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
  assert "P('tensor', None)" in text  # the item table is split by rows over tensor
  wire = dict(re.findall(r"^(data|tensor): ([\d.]+) MiB on the wire", text, re.M))
  assert set(wire) == {"data", "tensor"} and all(float(v) > 0 for v in wire.values()), wire
  assert display_types(nb).count("text/html") >= 2  # two visualize_array_sharding pictures


def check_pipeline(nb, text):
  rows = re.findall(r"^ *(\d+) +(\d+) (gpipe|1f1b|interleaved)(?: v=(\d+))? +\d+ +([\d.]+) +"
                    r"([\d.]+)", text, re.M)
  assert len(rows) == 26, rows  # 3 p x 3 m x 3 schedules, one invalid combination
  for p, m, name, v, bubble, theory in rows:
    p, m, v = int(p), int(m), int(v or 1)
    expected = (p - 1) / (v * m + p - 1)
    assert float(bubble) == pytest.approx(expected, abs=1e-4), (p, m, name)
    assert float(theory) == pytest.approx(expected, abs=1e-4), (p, m, name)
  assert display_types(nb).count("image/png") == 3  # the three timelines
  diffs = re.findall(r"pipelined loss (\S+) +reference loss (\S+) +rel diff (\S+)", text)
  assert len(diffs) == 3, text[-2000:]
  for loss, ref, rel in diffs:
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(float(ref), rel=1e-5)
  params = float(re.search(r"max rel param diff after \d+ steps (\S+)", text).group(1))
  assert params < 1e-3


def check_compression(nb, text):
  rows = {m: (float(b), float(loss)) for m, b, loss in re.findall(
      r"^(\S+/sync) +data +([\d.]+) MiB/step .*final loss ([\d.]+)", text, re.M)}
  assert list(rows) == ["none/sync", "bf16/sync", "int8/sync", "topk1%/sync",
                        "powersgd4/sync", "sign/sync"], text[-2000:]
  assert all(math.isfinite(loss) and 0 < loss < 20 for _, loss in rows.values()), rows
  fp32 = rows["none/sync"][0]
  assert rows["bf16/sync"][0] < 0.6 * fp32
  assert rows["int8/sync"][0] < 0.35 * fp32
  for method in ("topk1%/sync", "powersgd4/sync", "sign/sync"):
    assert rows[method][0] < rows["int8/sync"][0], (method, rows)
  assert "image/png" in display_types(nb)  # the bar chart


CHECKS = {"01_small_mesh_exploration": check_small_mesh,
          "02_pipeline_schedules": check_pipeline,
          "03_gradient_compression": check_compression}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_small_mode(name, kernel_env):
  nb = execute(name)
  CHECKS[name](nb, stdout(nb))
