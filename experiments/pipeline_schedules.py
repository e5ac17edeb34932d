"""Pipeline schedules side by side: bubbles, timelines, memory and compile time.

  python -m experiments.pipeline_schedules --cpu_devices=8 --out=out/pipeline_schedules

1. For p in {2,4,8} and m in {4,8,16}: each schedule's bubble fraction read from
   its table next to theory ((p-1)/(m+p-1); (p-1)/(v*m+p-1) interleaved), the
   same with backward ticks costing 2x (devices move in lockstep in one SPMD
   program, so a tick lasts as long as its slowest op), and the activation slots
   a device holds (its memory in microbatches).
2. A timeline picture per schedule (p=4, m=8): OUT/timeline_<schedule>.png.
3. The compiled peak memory per device and CPU compile time of the real train
   step for GPipe, 1F1B and interleaved on the same model with m=8.
4. Compile time and program size (HLO instructions) of the 1F1B step on pipe:4 for
   m = 4 ... 32: the scanned executor walks the schedule as data, so neither should
   grow with m.
Writes OUT/pipeline_schedules.json. On a CPU the 8 devices are faked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Model/run config for the memory part.",
    lock_config=True)
_OUT = flags.DEFINE_string("out", "out/pipeline_schedules", "Output folder.")
_MESH = flags.DEFINE_string("mesh", "pipe:4,data:2", "Mesh for the compiled-memory part.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 3706, "Catalogue size for the memory part.")


def bubble_table():
  from jaxrec.parallel.pipeline import PipelineConfigError, Schedule
  rows = []
  for p in (2, 4, 8):
    for m in (4, 8, 16):
      for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        try:
          s = Schedule(name, p, m, v)
        except PipelineConfigError as e:
          rows.append({"p": p, "m": m, "schedule": name, "v": v, "skipped": str(e)})
          continue
        rows.append({"p": p, "m": m, "schedule": name, "v": v, "ticks": s.ticks,
                     "bubble": s.bubble_fraction(), "theory": s.theory_bubble(),
                     "bubble_lockstep_b2": s.bubble_fraction(backward_cost=2.0),
                     "slots": s.num_slots})
  return rows


def plot_timeline(schedule, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  fig, ax = plt.subplots(figsize=(max(8, schedule.ticks * 0.35), 1.0 + 0.5 * schedule.pipe))
  cmap = plt.get_cmap("tab20")
  for t, row in enumerate(schedule.ops):
    for d, op in enumerate(row):
      if op is None:
        continue
      color = cmap((op.mb % 10) * 2 + (1 if op.kind == "B" else 0))
      ax.add_patch(Rectangle((t, schedule.pipe - 1 - d), 1, 1, facecolor=color,
                             edgecolor="black", linewidth=0.5))
      label = f"{op.kind}{op.mb}" + (f".{schedule.chunk_of(op.stage)}" if schedule.virtual > 1
                                     else "")
      ax.text(t + 0.5, schedule.pipe - 0.5 - d, label, ha="center", va="center", fontsize=6)
  ax.set_xlim(0, schedule.ticks)
  ax.set_ylim(0, schedule.pipe)
  ax.set_yticks([schedule.pipe - 0.5 - d for d in range(schedule.pipe)])
  ax.set_yticklabels([f"device {d}" for d in range(schedule.pipe)])
  ax.set_xlabel("tick")
  ax.set_title(f"{schedule.name} p={schedule.pipe} m={schedule.microbatches} "
               f"v={schedule.virtual}: bubble {schedule.bubble_fraction():.3f} "
               f"(theory {schedule.theory_bubble():.3f}), {schedule.num_slots} slots")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def hlo_instructions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " = " in line and "%" in line)


def compile_scaling(config, num_items: int, microbatches=(4, 8, 16, 32)):
  """(m, ticks, compile seconds, HLO instructions) of pipe:4 1F1B."""
  import jax
  from jaxrec.perf.comm import build_program, compile_step
  rows = []
  for m in microbatches:
    c = config.copy_and_resolve_references()
    c.mesh = "pipe:4"
    c.pipeline.schedule = "1f1b"
    c.pipeline.microbatches = m
    c.model.n_layers = 4
    c.train.batch_size = max(c.train.batch_size, m)
    program = build_program(c, num_items, jax.devices()[:4])
    start = time.perf_counter()
    compiled = compile_step(program)
    rows.append({"m": m, "ticks": program.layout.schedule.ticks,
                 "compile_s": time.perf_counter() - start,
                 "hlo_instructions": hlo_instructions(compiled)})
  return rows


def memory_rows(config, mesh: str, num_items: int):
  from jaxrec.perf import hlo
  from jaxrec.perf.comm import build_program, compile_step
  rows = []
  pipe = int(dict(p.split(":") for p in mesh.split(",")).get("pipe", 1))
  for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
    c = config.copy_and_resolve_references()
    c.mesh = mesh
    step = 2 * pipe   # every schedule here (interleaved: v = 2) splits the layers evenly
    c.model.n_layers = -(-c.model.n_layers // step) * step
    c.pipeline.schedule = name
    c.pipeline.virtual_stages = v
    c.pipeline.microbatches = 8
    start = time.perf_counter()
    program = build_program(c, num_items)
    compiled = compile_step(program)
    seconds = time.perf_counter() - start
    rows.append({"schedule": name, "v": v, "m": 8, "mesh": mesh,
                 "peak_memory_bytes": hlo.memory_stats(compiled)["peak_memory_bytes"],
                 "temp_bytes": hlo.memory_stats(compiled)["temp_size_in_bytes"],
                 "slots": program.layout.schedule.num_slots,
                 "ticks": program.layout.schedule.ticks,
                 "compile_s": seconds})
  return rows


def main(argv):
  del argv
  runtime.setup(cpu_devices=8)
  from jaxrec.parallel.pipeline import Schedule

  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = bubble_table()
  print(f"{'p':>3}{'m':>4} {'schedule':<14}{'ticks':>6}{'bubble':>9}{'theory':>9}"
        f"{'lockstep B=2F':>15}{'slots':>7}")
  for r in rows:
    if "skipped" in r:
      print(f"{r['p']:>3}{r['m']:>4} {r['schedule']:<14}  (not valid: m must be a multiple of p)")
      continue
    name = r["schedule"] + (f" v={r['v']}" if r["v"] > 1 else "")
    print(f"{r['p']:>3}{r['m']:>4} {name:<14}{r['ticks']:>6}{r['bubble']:>9.4f}"
          f"{r['theory']:>9.4f}{r['bubble_lockstep_b2']:>15.4f}{r['slots']:>7}")
  for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
    plot_timeline(Schedule(name, 4, 8, v), out / f"timeline_{name}.png")

  config = runtime.run_config(_CONFIG.value)
  memory = memory_rows(config, _MESH.value, _NUM_ITEMS.value)
  print(f"\ncompiled train step, mesh {_MESH.value}, m=8, d_model {config.model.d_model}, "
        f"{config.model.n_layers} layers, batch {config.train.batch_size} x "
        f"{config.data.max_len} (CPU compile)")
  print(f"{'schedule':<14}{'slots':>6}{'ticks':>7}{'peak MiB':>10}{'temp MiB':>10}{'compile s':>11}")
  for r in memory:
    name = r["schedule"] + (f" v={r['v']}" if r["v"] > 1 else "")
    print(f"{name:<14}{r['slots']:>6}{r['ticks']:>7}{r['peak_memory_bytes'] / 2**20:>10.1f}"
          f"{r['temp_bytes'] / 2**20:>10.1f}{r['compile_s']:>11.1f}")
  scaling = compile_scaling(config, _NUM_ITEMS.value,
                            (4, 8) if runtime.small() else (4, 8, 16, 32))
  print(f"\n1F1B on pipe:4, 4 layers: compile time and program size vs microbatches "
        f"(CPU compile)\n{'m':>4}{'ticks':>7}{'compile s':>11}{'HLO instr.':>12}")
  for r in scaling:
    print(f"{r['m']:>4}{r['ticks']:>7}{r['compile_s']:>11.1f}{r['hlo_instructions']:>12}")
  (out / "pipeline_schedules.json").write_text(json.dumps(
      {"bubbles": rows, "memory": memory, "compile_scaling": scaling,
       "config": config.to_dict(), "device": "CPU (compile only)"}, indent=2))
  print(f"\nwrote {out / 'pipeline_schedules.json'} and timeline_*.png")


if __name__ == "__main__":
  app.run(main)
