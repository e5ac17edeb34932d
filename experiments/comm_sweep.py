"""Communication and memory of one config across several meshes (compile only).

  python -m experiments.comm_sweep --cpu_devices=8 --num_items=100000 \
      --meshes="tensor:1,data:8;data:4,tensor:2;data:2,tensor:4;tensor:8" \
      --config.model.d_model=512 --config.model.n_layers=8 --out=out/comm_sweep

Prints per mesh the measured bytes per axis, the analytic bytes, their ratio and
the peak memory per device; writes OUT/comm_sweep.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=True)
_MESHES = flags.DEFINE_string("meshes", "data:8;data:4,tensor:2;data:2,tensor:4;tensor:8",
                              "Semicolon-separated mesh specs.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 0, "Catalogue size; 0 = from the dataset.")
_OUT = flags.DEFINE_string("out", "out/comm_sweep", "Output folder.")


def main(argv):
  del argv
  runtime.setup()
  from jaxrec.data import load_dataset
  from jaxrec.perf.comm import build_program, comm_report

  config = runtime.run_config(_CONFIG.value)
  num_items = _NUM_ITEMS.value or load_dataset(config.data).num_items
  rows = []
  for spec in [m.strip() for m in _MESHES.value.split(";") if m.strip()]:
    c = config.copy_and_resolve_references()
    c.mesh = spec
    with runtime.user_errors():
      report = comm_report(build_program(c, num_items))
    rows.append({"mesh": report["mesh"], "bytes_by_axis": report["bytes_by_axis"],
                 "analytic_bytes_by_axis": report["analytic_bytes_by_axis"],
                 "measured_over_analytic": report["measured_over_analytic"],
                 "peak_memory_bytes": report["peak_memory_bytes"],
                 "param_bytes_per_device": report["param_bytes_per_device"],
                 "flops": report["flops"]})
  print(f"config {config.name}: d_model {config.model.d_model}, {config.model.n_layers} layers, "
        f"{num_items} items, batch {config.train.batch_size} x {config.data.max_len}")
  print(f"{'mesh':<36}{'axis':<10}{'measured B':>14}{'analytic B':>14}{'ratio':>7}"
        f"{'peak MiB':>10}{'params MiB':>11}")
  for r in rows:
    axes = sorted(r["analytic_bytes_by_axis"]) or ["-"]
    for i, axis in enumerate(axes):
      m = r["bytes_by_axis"].get(axis, 0.0)
      a = r["analytic_bytes_by_axis"].get(axis, 0.0)
      ratio = f"{m / a:7.3f}" if a else "      -"
      head = (f"{r['mesh']:<36}" if i == 0 else " " * 36)
      tail = (f"{r['peak_memory_bytes'] / 2**20:>10.1f}{r['param_bytes_per_device'] / 2**20:>11.1f}"
              if i == 0 else "")
      print(f"{head}{axis:<10}{m:>14,.0f}{a:>14,.0f}{ratio}{tail}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "comm_sweep.json").write_text(json.dumps(
      {"config": config.to_dict(), "num_items": num_items, "rows": rows}, indent=2, default=float))
  print(f"wrote {out / 'comm_sweep.json'}")


if __name__ == "__main__":
  app.run(main)
