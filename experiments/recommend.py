"""Batch inference: top-k recommendations for every evaluated user of a run.

  python -m experiments.recommend --workdir=runs/quickstart --k=20 --output=recs.jsonl

Each user's history is their sequence before the test item (the test split's input)
and the items they have seen are not recommended again, so a user's first
recommendation is the test item exactly as often as the run's test HR@1 says
(printed next to it). `--users=1,2,3` limits it to those (original) user ids. With
several processes each writes its share of users to OUTPUT.partN (like evaluation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from experiments import runtime, serving_flags

_K = flags.DEFINE_integer("k", 20, "Recommendations per user.")
_OUTPUT = flags.DEFINE_string("output", "recs.jsonl", "JSON lines: user, items, scores.")
_USERS = flags.DEFINE_list("users", [], "Original user ids (default: every evaluated user).")
_BATCH = flags.DEFINE_integer("batch", 128, "Users per call.")


def main(argv):
  del argv
  runtime.setup()
  import jax
  import numpy as np

  servable, dataset = serving_flags.load()
  test = dataset.test
  rows = np.arange(len(test))
  if _USERS.value:
    wanted = {int(u) for u in _USERS.value}
    rows = np.asarray([r for r in rows if int(dataset.user_ids[test.users[r]]) in wanted])
    missing = wanted - {int(dataset.user_ids[test.users[r]]) for r in rows}
    if missing:
      raise app.UsageError(f"--users: unknown user ids {sorted(missing)[:10]}")
  rows = rows[jax.process_index()::jax.process_count()]   # this host's share
  out = Path(_OUTPUT.value)
  if jax.process_count() > 1:
    out = out.with_name(f"{out.name}.part{jax.process_index()}")
  start, hits, done = time.perf_counter(), 0, 0
  with open(out, "w") as f:
    for lo in range(0, len(rows), _BATCH.value):
      part = rows[lo:lo + _BATCH.value]
      recs = servable.recommend([test.history_of(r) for r in part], _K.value)
      for r, ids, scores in zip(part, recs.ids, recs.scores):
        hits += int(ids[0] == test.target[r])
        f.write(json.dumps({"user": int(dataset.user_ids[test.users[r]]),
                            "items": [int(dataset.item_ids[i]) for i in ids],
                            "scores": [round(float(s), 6) for s in scores]}) + "\n")
      done += len(part)
      rate = done / max(time.perf_counter() - start, 1e-9)
      print(f"\r{done}/{len(rows)} users  {rate:.0f} users/s  ETA "
            f"{(len(rows) - done) / max(rate, 1e-9):.0f}s", end="", flush=True)
  print()
  summary = Path(serving_flags.WORKDIR.value) / "summary.json"
  reported = json.loads(summary.read_text())["test"]["hr@1"] if summary.exists() else None
  print(json.dumps({"users": done, "top1_is_test_item": hits / max(done, 1),
                    "run_test_hr@1": reported, "output": str(out)}))


if __name__ == "__main__":
  app.run(main)
