"""Which strategy should this config use on N devices of a given kind?

  python -m experiments.plan --config=experiments/configs/ml1m.py --devices=64 \
      --hardware=h100 --num_items=3416 --top=10

Enumerates meshes (factorisations of N over replica/data/pipe/tensor), pipeline
schedules, microbatch counts and gradient compressions; drops plans whose
predicted peak memory does not fit; ranks the rest by predicted step time
(`jaxrec.perf.cost_model` on analytic profiles — nothing is compiled, so any N
works). Prints the top plans with predicted throughput, utilization and the
`--config.*` overrides that run them; writes OUT/plan.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=False)
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices to plan for.")
_HARDWARE = flags.DEFINE_string("hardware", "h100", "h100, tpu_v5p or local (fitted).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 0,
                                  "Catalogue size; 0 = read it from the config's dataset.")
_TOP = flags.DEFINE_integer("top", 10, "Plans to print.")
_OUT = flags.DEFINE_string("out", "out/plan", "Folder for plan.json.")
# The same devices with `tensor` and `data` swapped: what topology-aware placement buys.
PLACEMENT_SWAPPED = ("replica", "tensor", "pipe", "data")


def main(argv):
  del argv
  runtime.setup()
  from jaxrec.data import load_dataset
  from jaxrec import hardware
  from jaxrec.perf import planner

  config = runtime.run_config(_CONFIG.value)
  with runtime.user_errors():
    hw = hardware.get(_HARDWARE.value)
    num_items = _NUM_ITEMS.value or load_dataset(config.data).num_items
    fits, rejected = planner.plan(config, num_items, _DEVICES.value, hw)
  print(f"{len(fits) + len(rejected)} plans for {_DEVICES.value}x {hw.name}, "
        f"{len(rejected)} do not fit {hw.hbm_bytes / 2**30:.0f} GiB; "
        f"global batch {config.train.batch_size} x {config.data.max_len} tokens\n")
  print(f"{'#':>3} {'mesh':<32}{'step ms':>10}{'tokens/s':>12}{'util':>7}{'mem GiB':>9}  overrides")
  for i, c in enumerate(fits[:_TOP.value], 1):
    p = c.prediction
    extra = " ".join(f for f in c.flags().split() if not f.startswith("--config.mesh="))
    print(f"{i:>3} {c.mesh_spec:<32}{p.step_time * 1e3:>10.3f}{p.tokens_per_second:>12.4g}"
          f"{p.utilization:>7.1%}{c.profile.peak_memory_bytes / 2**30:>9.2f}  {extra}")
  if fits:
    from jaxrec.perf import cost_model
    best = fits[0]
    swapped = cost_model.predict(best.profile, hw, placement=PLACEMENT_SWAPPED)
    print(f"\naxis placement: tensor innermost (jaxrec's mesh) {best.prediction.step_time * 1e3:.3f}"
          f" ms; data innermost instead {swapped.step_time * 1e3:.3f} ms")
    print(f"\nrun the best:\n  python -m experiments.train --config=<this config> {best.flags()}")
  else:
    print("\nnothing fits: more devices, a smaller batch or more tensor/pipeline sharding")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = [{"mesh": c.mesh_spec, "overrides": c.overrides,
           "flags": c.flags(), **c.prediction.as_dict(),
           "peak_memory_bytes": c.profile.peak_memory_bytes} for c in fits]
  (out / "plan.json").write_text(json.dumps(
      {"hardware": hw.name, "devices": _DEVICES.value, "num_items": num_items,
       "rejected_for_memory": len(rejected), "plans": rows}, indent=2, default=float))
  print(f"wrote {out / 'plan.json'}")


if __name__ == "__main__":
  app.run(main)
