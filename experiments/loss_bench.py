"""What the item loss costs as the catalogue grows: memory, FLOPs and CPU time per head.

  python -m experiments.loss_bench --out=out/loss_bench

The Amazon Video model (SASRec, d=64, 2 layers, batch 256 x 50 positions) on one
device, with five item heads:

  full-untiled   one tile spanning the table and one chunk spanning every position:
                 the [positions, items] logits of the old head
  full-tiled     the default: online log-sum-exp over tiles of the table, real
                 targets only, in chunks of loss.token_chunk
  sampled-128    128 uniform negatives per target (HSTU's ML-1M recipe)
  sampled-1024   1024 uniform negatives per target
  in-batch       the batch's own targets as negatives, logQ-corrected

for 100k, 1M and 20M items. Every step is compiled (nothing is allocated for that):

  peak MiB       XLA's memory_analysis of the compiled step: arguments + outputs +
                 temporaries - aliased (params, Adam moments and batch included)
  temp MiB       temporaries alone (what the head's buffers change)
  model MiB      the planner's analytic peak for the same layout (perf.strategy)
  GFLOP/step     matmul FLOPs of the compiled step (HLO dots, every token chunk counted:
                 an upper bound, chunks without real targets are skipped at run time)

and, where the compiled peak fits --max_run_gib, the measured step time on this CPU
over a batch with Amazon-like history lengths (median 6 items, left-padded; ~12% of
the positions hold a real target). Writes OUT/loss_bench.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

_OUT = flags.DEFINE_string("out", "out/loss_bench", "Output folder.")
_ITEMS = flags.DEFINE_list("items", ["100000", "1000000", "20000000"], "Catalogue sizes.")
_HEADS = flags.DEFINE_list("heads", ["full-untiled", "full-tiled", "sampled-128",
                                     "sampled-1024", "in-batch"], "Heads to measure.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps where a head runs (after one warm-up).")
_MAX_RUN_GIB = flags.DEFINE_float("max_run_gib", 6.0,
                                  "Run (not only compile) where the compiled peak is below this.")

BATCH, MAX_LEN = 256, 50


def head_overrides(head: str, num_items: int) -> dict:
  slots = BATCH * MAX_LEN
  return {
      # one tile over the whole (padded) shard: the tile is capped at the shard's rows
      "full-untiled": {"loss.type": "full", "loss.item_tile": 1 << 40, "loss.token_chunk": slots},
      "full-tiled": {"loss.type": "full"},
      "sampled-128": {"loss.type": "sampled", "loss.num_negatives": 128},
      "sampled-1024": {"loss.type": "sampled", "loss.num_negatives": 1024},
      "in-batch": {"loss.type": "sampled", "loss.negatives": "in_batch"},
  }[head]


def amazon_like_batch(num_items: int, seed: int = 0):
  """Left-padded rows whose lengths follow a geometric law with median ~6 items."""
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.geometric(0.11, BATCH) + 1, 2, MAX_LEN + 1)
  inputs = np.zeros((BATCH, MAX_LEN), np.int32)
  targets = np.zeros((BATCH, MAX_LEN), np.int32)
  for r, n in enumerate(lengths):
    seq = rng.integers(1, num_items + 1, n)
    inputs[r, MAX_LEN - n + 1:] = seq[:-1]
    targets[r, MAX_LEN - n + 1:] = seq[1:]
  return {"inputs": inputs, "targets": targets}


def measure(head: str, num_items: int) -> dict:
  import jax
  from experiments.configs import amazon
  from jaxrec.config import with_overrides
  from jaxrec.perf import hlo, strategy
  from jaxrec.perf.comm import abstract_batch, build_program

  config = with_overrides(amazon.get_config(), {
      "mesh": "data:1", "train.batch_size": BATCH, "data.max_len": MAX_LEN,
      "model.dropout": 0.0, **head_overrides(head, num_items)})
  program = build_program(config, num_items, jax.devices()[:1])
  start = time.perf_counter()
  compiled = program.jitted_train_step().lower(program.abstract_state(),
                                               abstract_batch(program)).compile()
  compile_s = time.perf_counter() - start
  mem = hlo.memory_stats(compiled)
  row = {"head": head, "items": num_items, "compile_s": compile_s,
         "peak_mib": mem["peak_memory_bytes"] / 2 ** 20,
         "temp_mib": mem["temp_size_in_bytes"] / 2 ** 20,
         "model_mib": strategy.analytic_memory(program.layout) / 2 ** 20,
         "gflop_step": hlo.dot_flops(compiled.as_text(), program.branch_weights()) / 1e9,
         "step_s": None}
  if mem["peak_memory_bytes"] < _MAX_RUN_GIB.value * 2 ** 30:
    import numpy as np
    from jaxrec.data.batches import to_global
    state = program.init_state(0)
    host = amazon_like_batch(num_items)
    batch = to_global(program.mesh, host, BATCH)
    step = program.jitted_train_step()
    state, metrics = step(state, batch)             # warm-up (compiled above, cached)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(1 if runtime.small() else _STEPS.value):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    row["step_s"] = float(np.median(times))
    row["real_targets"] = int((host["targets"] > 0).sum())
    row["loss"] = float(metrics["loss"])
  return row


def main(argv):
  del argv
  runtime.setup()
  import jax

  rows = []
  device = f"1x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
  print(f"{'head':<14}{'items':>12}{'peak MiB':>11}{'temp MiB':>11}{'model MiB':>11}"
        f"{'GFLOP/step':>12}{'step s':>9}{'compile s':>11}")
  for num_items in [2000] if runtime.small() else (int(n) for n in _ITEMS.value):
    for head in _HEADS.value:
      with runtime.user_errors():
        row = measure(head, num_items)
      row["device"] = device
      rows.append(row)
      step = "-" if row["step_s"] is None else f"{row['step_s']:.2f}"
      print(f"{head:<14}{num_items:>12,}{row['peak_mib']:>11.0f}{row['temp_mib']:>11.0f}"
            f"{row['model_mib']:>11.0f}{row['gflop_step']:>12.1f}{step:>9}"
            f"{row['compile_s']:>11.1f}", flush=True)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "loss_bench.json").write_text(json.dumps(
      {"device": device, "batch": BATCH, "max_len": MAX_LEN, "rows": rows,
       "note": "peak/temp: XLA memory_analysis of the compiled step; GFLOP: HLO dot FLOPs "
               "with every token chunk counted (an upper bound: chunks without real "
               "targets are skipped at run time); model: the planner's analytic peak; "
               "step_s measured on this CPU (median of the timed steps)"},
      indent=2))
  print(f"wrote {out / 'loss_bench.json'}")


if __name__ == "__main__":
  app.run(main)
