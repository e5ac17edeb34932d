"""Predicted vs measured step time on the devices at hand.

  python -m experiments.validate_cost_model --cpu_devices=8 --out=out/validate_cost_model

1. Fits the local hardware profile from microbenchmarks (matmul FLOP/s, memory
   bandwidth, all-reduce latency/bandwidth; `jaxrec.perf.microbench`) and writes it
   to OUT/hardware_local.json (and out/hardware_local.json, where `--hardware=local`
   finds it).
2. For each strategy: compiles the real train step, reads its FLOPs and collectives
   from the HLO, predicts the step time with that profile, then times real steps
   (median after warm-up) and prints predicted vs measured with the error.
Writes OUT/validate_cost_model.json. The numbers say which device they came from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Base config (model shape).",
    lock_config=False)
_OUT = flags.DEFINE_string("out", "out/validate_cost_model", "Output folder.")
_MESHES = flags.DEFINE_list(
    "meshes", ["data:8", "data:4,tensor:2", "data:2,tensor:4", "tensor:8",
               "data:4,pipe:2", "data:2,pipe:2,tensor:2"],
    "Strategies to measure (meshes over all devices; pipelines run 1f1b x4).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 20000, "Catalogue size (synthetic batches).")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps per strategy (after 2 warm-up).")
_QUICK = flags.DEFINE_bool("quick", False, "Shorter microbenchmarks.")


def measure_step(program, steps: int, seed: int = 0) -> float:
  """Median seconds of real train steps on synthetic batches."""
  import jax
  import numpy as np
  from jaxrec.data.batches import to_global

  c = program.config
  rng = np.random.default_rng(seed)
  shape = (c.train.batch_size, c.data.max_len)
  items = program.fns.cfg.num_items
  host = {"inputs": rng.integers(1, items + 1, shape).astype(np.int32),
          "targets": rng.integers(1, items + 1, shape).astype(np.int32)}
  batch = to_global(program.mesh, host, shape[0])
  state = program.init_state(0)
  step = program.jitted_train_step()
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  runtime.setup()
  import jax
  from jaxrec.config import with_overrides
  from jaxrec.perf import cost_model, microbench, strategy
  from jaxrec.perf.comm import build_program, comm_report
  from jaxrec.hardware import LOCAL_PROFILE_PATH

  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
  print(f"fitting the local profile on {device} ...")
  hw, raw = microbench.fit_local_profile(quick=_QUICK.value or runtime.small())
  for path in (out / "hardware_local.json", LOCAL_PROFILE_PATH):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hw.to_json())
  print(f"  matmul fp32 {hw.peak_flops_fp32 / 1e9:.2f} GFLOP/s/device, bf16 "
        f"{hw.peak_flops / 1e9:.2f}; memory {hw.hbm_bandwidth / 1e9:.2f} GB/s; all-reduce "
        f"latency {hw.fast_latency * 1e6:.1f} us/step, bandwidth {hw.fast_bandwidth / 1e9:.2f} GB/s")

  rows = []
  for spec in _MESHES.value[:2] if runtime.small() else _MESHES.value:
    pipelined = {"pipeline.schedule": "1f1b", "pipeline.microbatches": 4} if "pipe" in spec else {}
    config = with_overrides(runtime.run_config(_CONFIG.value), {"mesh": spec, **pipelined})
    with runtime.user_errors():
      program = build_program(config, _NUM_ITEMS.value)
    report = comm_report(program)
    profile = strategy.hlo_profile(program.layout, report)
    pred = cost_model.predict(profile, hw)
    measured = measure_step(program, 1 if runtime.small() else _STEPS.value)
    err = (pred.step_time - measured) / measured
    rows.append({"mesh": spec, "predicted_s": pred.step_time, "measured_s": measured,
                 "error": err, "compute_s": pred.compute_time,
                 "comm_s_by_axis": pred.comm_time_by_axis, "stretch": pred.stretch,
                 "flops_per_device": profile.flops})
    print(f"{spec:<26} predicted {pred.step_time * 1e3:9.2f} ms  measured "
          f"{measured * 1e3:9.2f} ms  error {err:+7.1%}")
  mean_abs = sum(abs(r["error"]) for r in rows) / max(len(rows), 1)
  print(f"\nmean |error| {mean_abs:.1%} on {device}")
  result = {"device": device, "profile": json.loads(hw.to_json()), "microbench": raw,
            "model": {k: _CONFIG.value.model[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")},
            "batch": _CONFIG.value.train.batch_size, "seq_len": _CONFIG.value.data.max_len,
            "num_items": _NUM_ITEMS.value, "rows": rows, "mean_abs_error": mean_abs}
  (out / "validate_cost_model.json").write_text(json.dumps(result, indent=2, default=float))
  print(f"wrote {out / 'validate_cost_model.json'}")


if __name__ == "__main__":
  app.run(main)
