"""Which collectives a config's train step runs, over which mesh axes, how many bytes.

  python -m experiments.comm_report --config=experiments/configs/quickstart.py \
      --config.mesh=data:2,tensor:4 --cpu_devices=8 --out=out/comm

Prints a table and writes OUT/comm_report.json. The step is compiled from abstract
inputs (nothing is trained), so `--num_items=100000` accounts for a catalogue
larger than any dataset at hand.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "out/comm_report", "Folder for comm_report.json.")
_NUM_ITEMS = flags.DEFINE_integer(
    "num_items", 0, "Catalogue size; 0 = read it from the config's dataset.")


def main(argv):
  del argv
  runtime.setup()
  from jaxrec.data import load_dataset
  from jaxrec.perf import hlo
  from jaxrec.perf.comm import build_program, comm_report, format_report

  config = runtime.run_config(_CONFIG.value)
  with runtime.user_errors():
    num_items = _NUM_ITEMS.value or load_dataset(config.data).num_items
    report = comm_report(build_program(config, num_items))
  report["num_items"] = num_items
  print(format_report(report))
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "comm_report.json").write_text(hlo.to_json(report))
  print(f"\nwrote {out / 'comm_report.json'}")


if __name__ == "__main__":
  app.run(main)
