"""Per-stage pipeline costs, uniform vs balanced: what the load balancer would do.

  python -m experiments.balance_report --cpu_devices=8 --config.mesh=pipe:4,data:2 \
      --num_items=1000000 --config.model.n_layers=8 --out=out/balance_report

Measures the pieces (one layer, embedding, item head) of the config's compiled
step on its mesh — XLA cost analysis turned into seconds by a hardware profile
(`--hardware`), or timed on the local devices (`--hardware=timed`) — then prints
each stage's cost for the uniform split and for the balanced one (head on the
last stage, and spread over all stages), the imbalance (max / mean) and the
predicted step time from the schedule's table, bubble included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=True)
_NUM_ITEMS = flags.DEFINE_integer("num_items", 0, "Catalogue size; 0 = from the dataset.")
_HARDWARE = flags.DEFINE_string("hardware", "h100", "Profile for costs (h100, tpu_v5p, local) "
                                "or 'timed' to time the pieces on the local devices.")
_OUT = flags.DEFINE_string("out", "out/balance_report", "Output folder.")


def main(argv):
  del argv
  runtime.setup()
  from jaxrec.data import load_dataset
  from jaxrec.parallel import balance
  from jaxrec import hardware
  from jaxrec.perf.comm import build_program

  config = runtime.run_config(_CONFIG.value)
  with runtime.user_errors():
    num_items = _NUM_ITEMS.value or load_dataset(config.data).num_items
    program = build_program(config, num_items)
  lay = program.layout
  if not lay.pipe_axis:
    raise app.UsageError(f"the mesh {lay.mesh} has no pipe axis to balance")
  timed = _HARDWARE.value == "timed"
  costs = balance.measure(program.fns, program.mesh, config,
                          None if timed else hardware.get(_HARDWARE.value), timed=timed)
  p, v = lay.mesh.pipe, config.pipeline.virtual_stages
  args = (costs, config.model.n_layers, p, v, config.pipeline.schedule, lay.microbatches)
  plans = {
      "uniform, head on last stage": balance.uniform_plan(*args, head="last"),
      "balanced, head on last stage": balance.plan(*args, heads=("last",)),
      "uniform, head spread": balance.uniform_plan(*args, head="spread"),
      "balanced, head spread": balance.plan(*args, heads=("spread",)),
  }
  best = min(plans.values(), key=lambda pl: pl.step_time)
  unit = 1e3
  print(f"{config.model.n_layers} layers, {num_items} items, d_model {config.model.d_model}, "
        f"mesh {lay.mesh}, {config.pipeline.schedule} x{lay.microbatches}; costs: "
        f"{costs.source}")
  print(f"per microbatch (ms): layer fwd {costs.layer_fwd * unit:.4f} bwd "
        f"{costs.layer_bwd * unit:.4f}, embed {costs.embed * unit:.4f}, head "
        f"{costs.head * unit:.4f} (= {costs.head / costs.layer:.1f} layers)")
  print(f"\n{'split':<32}{'layers per stage':<20}{'stage costs (ms)':<44}{'max/mean':>9}"
        f"{'step ms':>10}")
  for name, pl in plans.items():
    stage = " ".join(f"{c * unit:.4f}" for c in pl.stage_costs)
    print(f"{name:<32}{str(list(pl.layers_per_stage)):<20}{stage:<44}{pl.imbalance:>9.3f}"
          f"{pl.step_time * unit:>10.4f}")
  print(f"\nrecommended: --config.pipeline.layers_per_stage="
        f"{','.join(map(str, best.layers_per_stage))} --config.pipeline.head={best.head} "
        f"(or layers_per_stage=auto); predicted {plans['uniform, head on last stage'].step_time / best.step_time:.2f}x "
        "faster than uniform with the head on the last stage")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "balance_report.json").write_text(json.dumps({
      "config": config.to_dict(), "num_items": num_items, "mesh": str(lay.mesh),
      "costs": dataclasses.asdict(costs),
      "plans": {k: dataclasses.asdict(pl) for k, pl in plans.items()},
      "recommended": dataclasses.asdict(best)}, indent=2))
  print(f"wrote {out / 'balance_report.json'}")


if __name__ == "__main__":
  app.run(main)
