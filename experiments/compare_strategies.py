"""The paper's experiment: hybrid parallelism vs data-, tensor- and pipeline-only.

  python -m experiments.compare_strategies --cpu_devices=64 --hardware=h100 \
      --out=out/compare_strategies

For three model sizes (small; ~1B dense with a 10M-item table; a small transformer
whose 20M-item table dominates) at N = 8, 64, 256, 1024 devices (weak scaling:
16 sequences of 100 items per device per step, bf16), each single mode (the best
compression / schedule the planner finds *on that mesh*) and the planner's overall
pick are costed on the target hardware. Where N is at most the number of devices
this process sees (`--cpu_devices`), FLOPs, bytes per axis and peak memory come
from compiling the real train step on that fake-device mesh; beyond, from the
analytic formulas (validated against the HLO in tests/test_cost_model.py). Every
row says which. Where the step compiles, the planner's top plans (ranked on the
formulas) are re-costed from their compiled steps and the best that fits memory
is kept: the analytic memory model does not know XLA's buffer scheduling. Writes OUT/compare_strategies.json and OUT/compare_strategies.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

_HARDWARE = flags.DEFINE_string("hardware", "h100", "Target profile: h100, tpu_v5p or local.")
_OUT = flags.DEFINE_string("out", "out/compare_strategies", "Output folder.")
_DEVICES = flags.DEFINE_list("devices", ["8", "64", "256", "1024"], "Device counts N.")
_SIZES = flags.DEFINE_list("sizes", ["small", "1b_10m_items", "table_20m_items"],
                           "Model sizes (see SIZES).")
_HLO_MAX_DEVICES = flags.DEFINE_integer(
    "hlo_max_devices", 64, "Compile the real step for N up to this (and the devices present).")
_HLO_RERANK = flags.DEFINE_integer(
    "hlo_rerank", 4, "Where N is compilable: re-cost this many of the planner's top plans "
    "from the compiled step and keep the best that fits.")
_SEQS_PER_DEVICE = flags.DEFINE_integer("seqs_per_device", 16, "Weak-scaling batch.")

SIZES = {
    # name: (d_model, n_layers, n_heads, d_ff, num_items)
    "small": (256, 8, 8, 1024, 100_000),
    "1b_10m_items": (2048, 24, 16, 6144, 10_000_000),
    "table_20m_items": (256, 4, 8, 1024, 20_000_000),
}
SEQ_LEN = 100
SINGLE_MODES = ("data", "tensor", "pipe")


def size_config(name: str, devices: int):
  from jaxrec.config import default_config
  d, layers, heads, d_ff, _ = SIZES[name]
  c = default_config()
  c.name = name
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = d, layers, heads, d_ff
  c.model.dtype = "bfloat16"
  c.model.dropout = 0.0
  c.data.max_len = SEQ_LEN
  c.train.batch_size = _SEQS_PER_DEVICE.value * devices
  return c


def best_on(config, num_items, shape, hw):
  """The planner's best variant (schedule, microbatches, compression) on one mesh."""
  from jaxrec.perf import planner
  cands = [planner.evaluate(config, num_items, shape, o, hw)
           for o in planner.variants(config, shape)]
  if not cands:
    return None
  fitting = [c for c in cands if c.prediction.fits]
  pool = fitting or cands
  return min(pool, key=lambda c: c.prediction.step_time)


def hlo_cost(config, num_items, cand, hw):
  """(profile, prediction, comm report) of a candidate from its compiled step, on
  the first N of this process's (fake) devices."""
  import jax
  from jaxrec.config import with_overrides
  from jaxrec.perf import cost_model, strategy
  from jaxrec.perf.comm import build_program, comm_report

  program = build_program(with_overrides(config, cand.overrides), num_items,
                          jax.devices()[:cand.shape.num_devices])
  report = comm_report(program)
  profile = strategy.hlo_profile(program.layout, report)
  return profile, cost_model.predict(profile, hw), report


def main(argv):
  del argv
  runtime.setup()
  import jax
  from jaxrec.mesh import MeshShape
  from jaxrec import hardware
  from jaxrec.perf import planner

  hw = hardware.get(_HARDWARE.value)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  present = jax.device_count()
  rows, gains = [], []
  for size in ["small"] if runtime.small() else _SIZES.value:
    num_items = SIZES[size][4]
    for n in [8] if runtime.small() else (int(x) for x in _DEVICES.value):
      config = size_config(size, n)
      start = time.time()
      fits, rejected = planner.plan(config, num_items, n, hw)
      picks = {}
      for mode in SINGLE_MODES:
        shape = MeshShape(**{mode: n})
        valid = any(s == shape for s in planner.mesh_candidates(config, n))
        picks[mode] = best_on(config, num_items, shape, hw) if valid else None
      picks["hybrid (planner)"] = fits[0] if fits else None
      for name, cand in picks.items():
        row = {"size": size, "devices": n, "strategy": name, "hardware": hw.name,
               "global_batch": config.train.batch_size, "seq_len": SEQ_LEN}
        if cand is None:
          row.update(source="-", feasible=False,
                     note="mesh impossible for this model (axis larger than heads/layers)"
                     if name != "hybrid (planner)" else "no plan fits memory")
          rows.append(row)
          continue
        pred, profile, source = cand.prediction, cand.profile, "analytic"
        compilable = n <= min(present, _HLO_MAX_DEVICES.value)
        if compilable and name == "hybrid (planner)":
          # the planner ranks on formulas; the compiled step has the last word on
          # memory, so the top few are re-costed and the best that fits is kept
          cand, profile, pred, tried = hlo_rerank(config, num_items, fits, hw)
          source = (f"hlo (compiled on {n} fake {jax.devices()[0].platform} devices; "
                    f"best of the planner's top {tried} by the compiled step)")
        elif compilable:
          profile, pred, _ = hlo_cost(config, num_items, cand, hw)
          source = f"hlo (compiled on {n} fake {jax.devices()[0].platform} devices)"
        row.update(source=source, feasible=True, mesh=cand.mesh_spec, flags=cand.flags(),
                   step_time_s=pred.step_time, tokens_per_s=pred.tokens_per_second,
                   utilization=pred.utilization, fits_memory=pred.fits,
                   memory_gib=profile.peak_memory_bytes / 2 ** 30,
                   comm_s_by_axis=pred.comm_time_by_axis, compute_s=pred.compute_time,
                   stretch=pred.stretch)
        rows.append(row)
      gains.append(_gain(rows, size, n))
      print(f"[{size} N={n}] planned {len(fits) + len(rejected)} candidates "
            f"({len(rejected)} do not fit) in {time.time() - start:.1f}s", flush=True)
  print(format_table(rows, gains))
  result = {"hardware": hw.name, "device_note": f"costs predicted for {hw.name}; bytes/FLOPs "
            f"from HLO compiled on up to {present} fake CPU devices or from formulas",
            "rows": rows, "gains": gains}
  (out / "compare_strategies.json").write_text(json.dumps(result, indent=2, default=float))
  _plot(rows, out / "compare_strategies.png")
  print(f"wrote {out / 'compare_strategies.json'} and compare_strategies.png")


def hlo_rerank(config, num_items, fits, hw):
  """(candidate, profile, prediction, tried) for the fastest of the planner's top
  `--hlo_rerank` compilable plans whose compiled peak memory fits; if none fits,
  the fastest of them (its row then says it does not fit)."""
  results = []
  for cand in fits[:_HLO_RERANK.value]:
    profile, pred, _ = hlo_cost(config, num_items, cand, hw)
    results.append((cand, profile, pred))
  if not results:
    return fits[0], fits[0].profile, fits[0].prediction, 0
  fitting = [r for r in results if r[2].fits] or results
  best = min(fitting, key=lambda r: r[2].step_time)
  return (*best, len(results))


def _gain(rows, size, n) -> dict:
  here = [r for r in rows if r["size"] == size and r["devices"] == n and r.get("feasible")]
  singles = [r for r in here if r["strategy"] in SINGLE_MODES and r["fits_memory"]]
  hybrid = [r for r in here if r["strategy"] == "hybrid (planner)"]
  out = {"size": size, "devices": n, "best_single": None, "throughput_gain": None,
         "utilization_gain": None, "throughput_gain_ignoring_memory": None}
  any_single = [r for r in here if r["strategy"] in SINGLE_MODES]
  if hybrid and any_single:   # what the hybrid buys even if memory were no object
    best_any = max(any_single, key=lambda r: r["tokens_per_s"])
    out["throughput_gain_ignoring_memory"] = hybrid[0]["tokens_per_s"] / best_any["tokens_per_s"] - 1
    out["best_single_ignoring_memory"] = best_any["strategy"]
  if hybrid and not hybrid[0]["fits_memory"]:
    out["note"] = (f"no plan verified to fit: the hybrid needs {hybrid[0]['memory_gib']:.0f} GiB "
                   f"({hybrid[0]['source'].split(' (')[0]})")
  elif hybrid and singles:
    best = max(singles, key=lambda r: r["tokens_per_s"])
    out.update(best_single=best["strategy"],
               throughput_gain=hybrid[0]["tokens_per_s"] / best["tokens_per_s"] - 1,
               utilization_gain=hybrid[0]["utilization"] - best["utilization"])
  elif hybrid:
    out["note"] = "no single mode fits memory; only a hybrid plan runs"
  else:
    out["note"] = "no plan fits memory on this many devices"
  return out


def format_table(rows, gains) -> str:
  lines = [f"{'size':<16}{'N':>5} {'strategy':<17}{'mesh':<34}{'tokens/s':>12}{'util':>7}"
           f"{'mem GiB':>9} {'fits':<5} source"]
  for r in rows:
    if not r.get("feasible"):
      lines.append(f"{r['size']:<16}{r['devices']:>5} {r['strategy']:<17}{'-':<34}"
                   f"{'':>12}{'':>7}{'':>9} {'':<5} {r['note']}")
      continue
    lines.append(f"{r['size']:<16}{r['devices']:>5} {r['strategy']:<17}{r['mesh']:<34}"
                 f"{r['tokens_per_s']:>12.3g}{r['utilization']:>7.1%}{r['memory_gib']:>9.1f} "
                 f"{str(r['fits_memory']):<5} {r['source']}")
  lines += ["", f"{'size':<16}{'N':>5}  hybrid gain over the best single mode that fits"]
  for g in gains:
    unbounded = ""
    if g["throughput_gain_ignoring_memory"] is not None:
      unbounded = (f"; ignoring memory {g['throughput_gain_ignoring_memory']:+.1%} vs "
                   f"{g['best_single_ignoring_memory']}")
    if g["throughput_gain"] is None:
      lines.append(f"{g['size']:<16}{g['devices']:>5}  {g.get('note', '-')}{unbounded}")
    else:
      lines.append(f"{g['size']:<16}{g['devices']:>5}  throughput {g['throughput_gain']:+.1%} "
                   f"vs {g['best_single']}, utilization {g['utilization_gain']:+.1%} points"
                   f"{unbounded}")
  return "\n".join(lines)


def _plot(rows, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sizes = sorted({r["size"] for r in rows}, key=list(SIZES).index)
  fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    for i, strategy in enumerate((*SINGLE_MODES, "hybrid (planner)")):
      here = [r for r in rows if r["size"] == size and r["strategy"] == strategy
              and r.get("feasible")]
      color = f"C{i}"
      line = [(r["devices"], r["tokens_per_s"]) for r in here]
      if line:
        ax.plot(*zip(*line), color=color, alpha=0.35, linestyle=":")
      for fits, marker in ((True, "o"), (False, "x")):
        pts = [(r["devices"], r["tokens_per_s"]) for r in here if r["fits_memory"] == fits]
        if pts:
          ax.plot(*zip(*pts), color=color, marker=marker, linestyle="none",
                  label=f"{strategy}{'' if fits else ' (does not fit)'}")
    ax.set(xscale="log", yscale="log", title=size, xlabel="devices", ylabel="tokens/s")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
