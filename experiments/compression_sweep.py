"""Quality vs data-axis traffic for every compressor and data-parallel mode.

  python -m experiments.compression_sweep --cpu_devices=8 --config.mesh=data:8 \
      --config.train.steps=600 --out=out/compression_sweep

Trains the same config once per (method, mode) variant, for the same steps and
batches, and records validation/test NDCG@10 against the gradient traffic per
step, read from the compiled HLO (ring-model wire bytes per device; collectives
that run once every H steps count 1/H):

  dp bytes     everything the data-parallel exchange sends (data and replica axes)
  slow bytes   what crosses the slowest links: the `replica` axis when the mesh has
               one (hierarchical variants reduce over `data` uncompressed first),
               else all dp bytes (in a flat ring every byte may cross them)

Writes OUT/compression_sweep.json and OUT/ndcg_vs_bytes.png, and prints a table
plus which variants cut the slow-link bytes >= 100x versus sync/none within 1%
relative validation NDCG@10.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "out/compression_sweep", "Output folder.")
_RESUME = flags.DEFINE_bool(
    "resume", True, "Reuse finished variants found in OUT/compression_sweep.json.")
_REMEASURE = flags.DEFINE_bool(
    "remeasure_bytes", False, "For reused variants, measure the bytes again from the "
    "current code's compiled step (compile only; their quality stays as run).")
_VARIANTS = flags.DEFINE_string(
    "variants", "", "Comma-separated variant names to run (default: all). Names: "
    "see VARIANTS in this file.")

# name -> overrides of config.compression / config.dp
VARIANTS: dict[str, dict[str, object]] = {
    "none/sync": {},
    "none/sync/seed1": {"seed": 1},
    "bf16/sync": {"compression.method": "bf16"},
    "int8/sync": {"compression.method": "int8"},
    "int8-stochastic/sync": {"compression.method": "int8",
                             "compression.stochastic_rounding": True,
                             "compression.error_feedback": False},
    "topk1%/sync": {"compression.method": "topk", "compression.ratio": 0.01},
    "topk1%-warmup/sync": {"compression.method": "topk", "compression.ratio": 0.01,
                           "compression.warmup_steps": 100},
    "powersgd4/sync": {"compression.method": "powersgd", "compression.rank": 4},
    "sign/sync": {"compression.method": "sign"},
    "none/delayed": {"dp.mode": "delayed"},
    "none/local_sgd4": {"dp.mode": "local_sgd", "dp.sync_every": 4},
    # local_sgd's outer step x sqrt(R) (dp.local_sgd_step; the default is the mean)
    "none/local_sgd4-sqrt": {"dp.mode": "local_sgd", "dp.sync_every": 4,
                             "dp.local_sgd_step": "sqrt_replicas"},
    # DiLoCo with the paper's outer step (lr 0.7, Nesterov momentum 0.9)
    "none/diloco16": {"dp.mode": "diloco", "dp.sync_every": 16, "dp.outer_momentum": 0.9},
    "int8/diloco32": {"dp.mode": "diloco", "dp.sync_every": 32, "compression.method": "int8",
                      "dp.outer_momentum": 0.9},
    "sign/diloco4": {"dp.mode": "diloco", "dp.sync_every": 4, "compression.method": "sign",
                     "dp.outer_momentum": 0.9},
    "powersgd4/local_sgd8": {"dp.mode": "local_sgd", "dp.sync_every": 8,
                             "compression.method": "powersgd"},
    # the hybrid: the rows-sharded table synchronous (its sparse gradient reaches its
    # owner every step), only the dense layers local; its row exchange counts as
    # data-axis bytes like every other collective
    "rows/sync": {"embedding.sharding": "rows"},
    "rows/local_sgd4": {"embedding.sharding": "rows", "dp.mode": "local_sgd",
                        "dp.sync_every": 4},
    "rows/local_sgd4-sqrt": {"embedding.sharding": "rows", "dp.mode": "local_sgd",
                             "dp.sync_every": 4, "dp.local_sgd_step": "sqrt_replicas"},
    "rows/diloco16": {"embedding.sharding": "rows", "dp.mode": "diloco", "dp.sync_every": 16,
                      "dp.outer_momentum": 0.9},
    # is it H or DiLoCo's outer step? local SGD at H=16, and a gentler outer momentum
    "rows/local_sgd16": {"embedding.sharding": "rows", "dp.mode": "local_sgd",
                         "dp.sync_every": 16},
    "rows/local_sgd16-sqrt": {"embedding.sharding": "rows", "dp.mode": "local_sgd",
                              "dp.sync_every": 16, "dp.local_sgd_step": "sqrt_replicas"},
    "rows/diloco16-m0.5": {"embedding.sharding": "rows", "dp.mode": "diloco",
                           "dp.sync_every": 16, "dp.outer_momentum": 0.5},
    "rows-int8/diloco16-m0.5-int8": {"embedding.sharding": "rows",
                                     "embedding.row_gradients": "int8", "dp.mode": "diloco",
                                     "dp.sync_every": 16, "dp.outer_momentum": 0.5,
                                     "compression.method": "int8"},
    "rows-sign/diloco16-m0.5-sign": {"embedding.sharding": "rows",
                                     "embedding.row_gradients": "int8", "dp.mode": "diloco",
                                     "dp.sync_every": 16, "dp.outer_momentum": 0.5,
                                     "compression.method": "sign"},
    # the table's sparse optimizer under the sync hybrid (the rows table's quality guard)
    "rows-lazy/sync": {"embedding.sharding": "rows", "embedding.optimizer": "lazy_adam"},
    "none/delayed/seed1": {"dp.mode": "delayed", "seed": 1},
    # two nodes of four devices: reduce inside a node uncompressed, compress across
    "none/sync@2x4": {"mesh": "replica:2,data:4"},
    "int8-hier/sync@2x4": {"mesh": "replica:2,data:4", "compression.method": "int8",
                           "compression.hierarchical": True},
    "sign-hier/sync@2x4": {"mesh": "replica:2,data:4", "compression.method": "sign",
                           "compression.hierarchical": True},
    "topk1%-hier/sync@2x4": {"mesh": "replica:2,data:4", "compression.method": "topk",
                             "compression.ratio": 0.01, "compression.hierarchical": True},
}


def main(argv):
  del argv
  runtime.setup()
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxrec.config import with_overrides
  from jaxrec.data import load_dataset
  from jaxrec.perf.comm import build_program, comm_report
  from jaxrec.train.loop import train_and_evaluate

  base = runtime.run_config(_CONFIG.value)
  # every variant is compared at the same final step: no periodic evaluation, no selection
  base.train.eval_every = 0
  base.train.select_on = ""
  names = [n.strip() for n in _VARIANTS.value.split(",") if n.strip()] or list(VARIANTS)
  if runtime.small() and not _VARIANTS.value.strip():
    names = names[:2]   # smoke run: the baseline and one compressor
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  num_items = load_dataset(base.data).num_items
  previous = {}
  if _RESUME.value and (out / "compression_sweep.json").exists():
    previous = {r["variant"]: r for r in json.loads(
        (out / "compression_sweep.json").read_text())["rows"]}
  # variants run before and not asked for now stay in the table
  rows = [r for name, r in previous.items() if name not in names]

  def measured_bytes(config) -> dict[str, object]:
    with runtime.user_errors():
      report = comm_report(build_program(config, num_items))
    wire = report["wire_bytes_by_axis"]
    dp_wire = sum(v for k, v in wire.items() if "data" in k or "replica" in k)
    slow = (sum(v for k, v in wire.items() if "replica" in k)
            if "replica:1," not in report["mesh"] else dp_wire)
    return {"mesh": report["mesh"], "data_wire_bytes_per_step": dp_wire,
            "slow_link_wire_bytes_per_step": slow,
            "data_buffer_bytes_per_step": sum(v for k, v in report["bytes_by_axis"].items()
                                              if "data" in k or "replica" in k)}

  for name in names:
    config = with_overrides(base, VARIANTS[name])
    if name in previous:
      row = previous[name]
      row.setdefault("slow_link_wire_bytes_per_step", row["data_wire_bytes_per_step"])
      if _REMEASURE.value:
        row.update(measured_bytes(config))
      rows.append(row)
      continue
    measured = measured_bytes(config)
    start = time.perf_counter()
    summary = train_and_evaluate(config, out / "runs" / name.replace("/", "_"))
    rows.append({
        "variant": name, "method": config.compression.method, "mode": config.dp.mode,
        "sync_every": config.dp.sync_every, "local_sgd_step": config.dp.local_sgd_step,
        "hierarchical": bool(config.compression.hierarchical), **measured,
        "valid_ndcg@10": summary["valid"]["ndcg@10"], "valid_hr@10": summary["valid"]["hr@10"],
        "test_ndcg@10": summary["test"]["ndcg@10"], "test_hr@10": summary["test"]["hr@10"],
        "wall_time_s": time.perf_counter() - start,
    })
    logging.info("%s: %s", name, rows[-1])
    (out / "compression_sweep.json").write_text(json.dumps(
        {"config": base.to_dict(), "rows": rows}, indent=2))

  ref = next((r for r in rows if r["variant"] == "none/sync"), rows[0])
  print(f"\nconfig {base.name}, {base.train.steps} steps, 8 devices; bytes = wire bytes per "
        "step per device (ring model, from compiled HLO)")
  print(f"{'variant':<24}{'dp bytes':>12}{'slow bytes':>12}{'ratio':>9}{'valid NDCG@10':>15}"
        f"{'rel.':>8}{'test NDCG@10':>14}{'wall s':>8}")
  winners = []
  for r in rows:
    r["bytes_ratio"] = (ref["slow_link_wire_bytes_per_step"] /
                        max(r["slow_link_wire_bytes_per_step"], 1e-9))
    r["relative_valid_ndcg"] = (r["valid_ndcg@10"] / ref["valid_ndcg@10"] - 1.0
                                if ref["valid_ndcg@10"] > 0 else 0.0)
    print(f"{r['variant']:<24}{r['data_wire_bytes_per_step']:>12,.0f}"
          f"{r['slow_link_wire_bytes_per_step']:>12,.0f}{r['bytes_ratio']:>8.1f}x"
          f"{r['valid_ndcg@10']:>15.4f}{100 * r['relative_valid_ndcg']:>7.1f}%"
          f"{r['test_ndcg@10']:>14.4f}{r['wall_time_s']:>8.0f}")
    if r["bytes_ratio"] >= 100 and r["relative_valid_ndcg"] >= -0.01:
      winners.append(r["variant"])
  print("\n>= 100x fewer slow-link bytes within 1% relative valid NDCG@10 of none/sync:",
        ", ".join(winners) or "none")
  (out / "compression_sweep.json").write_text(json.dumps(
      {"config": base.to_dict(), "rows": rows, "winners": winners},
      indent=2))

  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    ax.scatter(r["slow_link_wire_bytes_per_step"], r["valid_ndcg@10"])
    ax.annotate(r["variant"], (r["slow_link_wire_bytes_per_step"], r["valid_ndcg@10"]),
                fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("slow-link gradient bytes per step per device (ring model, compiled HLO)")
  ax.set_ylabel("validation NDCG@10")
  ax.set_title(f"{base.name}: quality vs gradient traffic ({base.train.steps} steps)")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "ndcg_vs_bytes.png", dpi=120)
  print(f"wrote {out / 'compression_sweep.json'} and {out / 'ndcg_vs_bytes.png'}")


if __name__ == "__main__":
  app.run(main)
