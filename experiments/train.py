"""Train and evaluate a recommender: `python -m experiments.train [--config=...]`.

With no flags it trains the quickstart config on the embedded MovieLens data.
Every config field can be overridden, e.g. `--config.mesh=data:2,tensor:4
--config.train.steps=200`; `--cpu_devices=8` fakes 8 CPU devices to explore meshes.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart",
                               "Run folder: checkpoints, metrics.jsonl, summary.json. "
                               "A rerun with the same folder resumes.")


def main(argv: list[str]) -> None:
  del argv
  runtime.setup()
  from jaxrec.train.loop import train_and_evaluate  # after the device flags are applied
  with runtime.user_errors():
    summary = train_and_evaluate(runtime.run_config(_CONFIG.value), _WORKDIR.value)
  if summary is None:
    print(f"stopped early; the checkpoint in {_WORKDIR.value} resumes the run when the same "
          "command is run again")
    return
  keys = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")
  baseline = summary["baseline_most_popular_test"]
  print(json.dumps({
      "test": {k: round(summary["test"][k], 4) for k in keys},
      "most_popular_test": baseline and {k: round(baseline[k], 4) for k in keys},
      "protocol": summary["protocol"],
      "wall_time_s": round(summary["wall_time_s"], 1),
      "workdir": _WORKDIR.value,
  }, indent=2))
  logging.info("summary written to %s/summary.json", _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
