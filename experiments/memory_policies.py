"""Peak memory per rematerialisation and precision policy, compiled, next to the planner's model.

  python -m experiments.memory_policies --out=out/memory_policies

A d=1024, 24-layer SASRec (16 heads, d_ff 4096, 200 positions, batch 16, 100k items,
tiled full softmax) on one device, compiled only (no arrays are allocated):

  remat      model.remat = none | full | dots_saveable | save_attention_out (fp32)
  precision  compute / params / Adam moments / fp32 master copy:
             fp32 | bf16 compute | bf16 params + fp32 master | all bf16, no master

For each: XLA's memory_analysis of the compiled step (arguments = params + optimizer
state + batch, temporaries = activations and the head's working set, peak = arguments
+ outputs - aliased + temporaries), the planner's analytic peak for the same layout
(perf.strategy.analytic_memory), and the step's matmul GFLOPs (remat recomputes).
Writes OUT/memory_policies.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

_OUT = flags.DEFINE_string("out", "out/memory_policies", "Output folder.")

MODEL = {"model.d_model": 1024, "model.n_layers": 24, "model.n_heads": 16,
         "model.d_ff": 4096, "data.max_len": 200, "train.batch_size": 16,
         "model.dropout": 0.0, "mesh": "data:1"}
NUM_ITEMS = 100_000
ROWS = [
    ("remat", "none", {}),
    ("remat", "full", {"model.remat": "full"}),
    ("remat", "dots_saveable", {"model.remat": "dots_saveable"}),
    ("remat", "save_attention_out", {"model.remat": "save_attention_out"}),
    ("precision", "fp32", {}),
    ("precision", "bf16 compute", {"model.dtype": "bfloat16"}),
    ("precision", "bf16 params + fp32 master",
     {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}),
    ("precision", "all bf16, no master",
     {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
      "train.opt_state_dtype": "bfloat16", "train.master_weights": False}),
]


def measure(model: dict, overrides: dict) -> dict:
  import jax
  from jaxrec.config import default_config, with_overrides
  from jaxrec.perf import hlo, strategy
  from jaxrec.perf.comm import abstract_batch, build_program

  config = with_overrides(default_config(), {**model, **overrides})
  program = build_program(config, NUM_ITEMS, jax.devices()[:1])
  start = time.perf_counter()
  compiled = program.jitted_train_step().lower(program.abstract_state(),
                                               abstract_batch(program)).compile()
  mem = hlo.memory_stats(compiled)
  gib = 2 ** 30
  return {"peak_gib": mem["peak_memory_bytes"] / gib,
          "arguments_gib": mem["argument_size_in_bytes"] / gib,
          "temp_gib": mem["temp_size_in_bytes"] / gib,
          "model_gib": strategy.analytic_memory(program.layout) / gib,
          "gflop_step": hlo.dot_flops(compiled.as_text(), program.branch_weights()) / 1e9,
          "compile_s": time.perf_counter() - start,
          "num_params": program.fns.num_params()}


def main(argv):
  del argv
  runtime.setup()
  import jax

  device = f"1x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), compiled only"
  rows = ROWS if not runtime.small() else [ROWS[0], ROWS[1], ROWS[6]]
  model = MODEL if not runtime.small() else {**MODEL, "model.d_model": 64, "model.n_layers": 2,
                                             "model.d_ff": 256, "model.n_heads": 2}
  print(f"{'policy':<10}{'setting':<28}{'peak GiB':>9}{'args GiB':>9}{'temp GiB':>9}"
        f"{'model GiB':>10}{'GFLOP':>9}")
  results = []
  for kind, name, overrides in rows:
    with runtime.user_errors():
      row = {"policy": kind, "setting": name, "overrides": overrides, **measure(model, overrides)}
    results.append(row)
    print(f"{kind:<10}{name:<28}{row['peak_gib']:>9.2f}{row['arguments_gib']:>9.2f}"
          f"{row['temp_gib']:>9.2f}{row['model_gib']:>10.2f}{row['gflop_step']:>9.0f}",
          flush=True)
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "memory_policies.json").write_text(json.dumps(
      {"device": device, "model": model, "num_items": NUM_ITEMS, "rows": results}, indent=2))
  print(f"wrote {out / 'memory_policies.json'}")


if __name__ == "__main__":
  app.run(main)
