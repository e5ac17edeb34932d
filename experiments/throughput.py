"""Where the time of a training step goes, and how many real tokens it processes.

  python -m experiments.throughput --runs=amazon,amazon+packing,ml1m,ml1m+packing \
      --steps=10 --out=out/throughput

For each run (a config file, unpacked; `+packing` packs rows greedily) it builds the real
input pipeline and train step, then times --steps steps (after two warm-up steps):

  real tok/s   real (non-padding) targets per second
  data ms      time the loop waited for the next host batch and its transfer
  device ms    time from dispatching the step to its result (compute + collectives)
  fill         real targets / row positions
  FLOP/tok     matmul FLOPs of the compiled step per real target (HLO: dots, and on
               GPU the GEMM custom calls)
  MFU          useful model FLOPs / (devices x peak x step time), with the running
               device's published profile (H100, TPU v5p) or --hardware; "-" on CPU

A benchmark, not a test: numbers are this machine's, and the JSON says which device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

RUNS = {
    "quickstart": "experiments/configs/quickstart.py",
    "amazon": "experiments/configs/amazon.py",
    "ml1m": "experiments/configs/ml1m.py",
}
_RUNS = flags.DEFINE_list("runs", ["amazon", "amazon+packing", "ml1m", "ml1m+packing"],
                          f"Runs: {sorted(RUNS)}, each optionally +packing.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "out/throughput", "Output folder.")
_HARDWARE = flags.DEFINE_string("hardware", "", "Profile for MFU (h100, tpu_v5p, local); "
                                "default: the running device's, if published.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides for every run, field=value (e.g. model.dtype=bfloat16).")


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def measure(name: str, steps: int, hw):
  import jax
  import numpy as np
  from jaxrec.config import with_overrides
  from jaxrec.data.batches import TrainStream, process_rows, to_global
  from jaxrec.data.pipeline import train_batches
  from jaxrec.perf import hlo
  from jaxrec.perf.comm import compile_step
  from jaxrec.train.loop import build

  base, _, extra = name.partition("+")
  config = runtime.run_config(runtime.load_config(RUNS[base]))
  overrides = dict(o.split("=", 1) for o in _OVERRIDES.value)
  overrides = {k: parse_value(v) for k, v in overrides.items()}
  # the run's name says the packing, whatever the config ships with
  overrides["data.packing"] = "greedy" if extra == "packing" else "none"
  config = with_overrides(config, overrides)
  mesh, dataset, fns, program = build(config)
  stream = TrainStream(dataset.train, config.train.batch_size, config.data.shuffle_seed,
                       config.data.packing, with_times=fns.uses_time)
  rows = process_rows(mesh, config.train.batch_size)
  batches = train_batches(stream, rows, 0, config.data.prefetch)
  compiled = compile_step(program)
  flops_per_step = hlo.dot_flops(compiled.as_text(), program.branch_weights())
  state = program.init_state(config.seed)
  data_s, device_s, real = [], [], []
  for step in range(steps + 2):
    t0 = time.perf_counter()
    batch = to_global(mesh, next(batches), config.train.batch_size)
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    state, metrics = program.train_step(state, batch, step)
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    if step >= 2:
      data_s.append(t1 - t0)
      device_s.append(t2 - t1)
      real.append(float(metrics["tokens"]))
  step_s = float(np.mean(data_s) + np.mean(device_s))
  lay = program.layout
  row = {
      "run": name, "mesh": str(lay.mesh), "packing": config.data.packing,
      "batch": f"{config.train.batch_size}x{config.data.max_len}",
      "real_tokens_per_step": float(np.mean(real)),
      "real_tokens_per_s": float(np.mean(real)) / step_s,
      "data_ms": 1e3 * float(np.mean(data_s)), "device_ms": 1e3 * float(np.mean(device_s)),
      "fill_rate": stream.fill_rate(0),
      "flops_per_real_token": flops_per_step * mesh.size / float(np.mean(real)),
      "device": f"{mesh.size}x {mesh.devices.flat[0].device_kind}",
  }
  if hw is not None:
    peak = hw.peak_flops if fns.cfg.compute_dtype == jax.numpy.bfloat16 else hw.peak_flops_fp32
    useful = lay.model_flops() * float(np.mean(real)) / lay.tokens   # real tokens only
    row["mfu"] = useful / (mesh.size * peak * step_s)
    row["hardware"] = hw.name
  return row


def main(argv):
  del argv
  runtime.setup()
  import jax
  from jaxrec import hardware

  hw = (hardware.get(_HARDWARE.value) if _HARDWARE.value
        else hardware.for_device(jax.devices()[0].device_kind))
  rows = []
  for name in _RUNS.value:
    if name.partition("+")[0] not in RUNS:
      raise app.UsageError(f"unknown run {name!r}; known: {sorted(RUNS)} (+packing)")
    with runtime.user_errors():
      rows.append(measure(name, 2 if runtime.small() else _STEPS.value, hw))
    r = rows[-1]
    print(f"{r['run']:<18} {r['batch']:>8}  fill {r['fill_rate']:5.1%}  real tok/s "
          f"{r['real_tokens_per_s']:9.0f}  data {r['data_ms']:7.1f} ms  device "
          f"{r['device_ms']:8.1f} ms  FLOP/tok {r['flops_per_real_token']:.3e}  MFU "
          f"{r['mfu']:.1%}" if "mfu" in r else
          f"{r['run']:<18} {r['batch']:>8}  fill {r['fill_rate']:5.1%}  real tok/s "
          f"{r['real_tokens_per_s']:9.0f}  data {r['data_ms']:7.1f} ms  device "
          f"{r['device_ms']:8.1f} ms  FLOP/tok {r['flops_per_real_token']:.3e}  MFU -",
          flush=True)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "throughput.json").write_text(json.dumps({"rows": rows}, indent=2))
  print(f"wrote {out / 'throughput.json'}")


if __name__ == "__main__":
  app.run(main)
