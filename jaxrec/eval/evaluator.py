"""Full-ranking evaluation over the mesh: every user against the whole catalogue.

Batches are split over the data axes; the item table stays sharded over `tensor`
and each shard counts how many of its items outscore the target, so ranks are
exact and no device ever holds all scores of a row.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxrec.data.batches import eval_batches, process_rows, to_global
from jaxrec.data.sequences import EvalExamples
from jaxrec.eval.metrics import metrics_from_ranks


def evaluate(rank_fn: Callable[[Any, dict], jax.Array], params: Any, mesh: Mesh,
             examples: EvalExamples, batch_size: int, exclude: str,
             with_times: bool = False) -> dict[str, float]:
  """Metrics for `examples`; `rank_fn(params, global_batch)` -> ranks [batch]."""
  start = time.perf_counter()
  rows = process_rows(mesh, batch_size)
  ranks, weights = [], []
  for batch in eval_batches(examples, batch_size, exclude, with_times):
    weights.append(batch.pop("weight"))
    local = {k: v[rows] for k, v in batch.items()}
    out = rank_fn(params, to_global(mesh, local, batch_size))
    ranks.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
  result = metrics_from_ranks(np.concatenate(ranks), np.concatenate(weights))
  result["eval_time_s"] = time.perf_counter() - start
  return result
