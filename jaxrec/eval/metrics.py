"""Ranking metrics from 0-based target ranks, and a brute-force numpy reference.

Protocol (DESIGN.md): leave-one-out, full ranking over the whole catalogue, the
user's history removed from the candidates when `exclude_history` (the target
itself is never removed), ties counted against the target.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS: tuple[int, ...] = (1, 5, 10, 20, 50)


def metrics_from_ranks(ranks: np.ndarray, weights: np.ndarray | None = None,
                       ks: Sequence[int] = KS) -> dict[str, float]:
  """HR@K, NDCG@K and MRR averaged over rows with weight > 0."""
  ranks = np.asarray(ranks, np.float64)
  w = np.ones_like(ranks) if weights is None else np.asarray(weights, np.float64)
  n = w.sum()
  if n <= 0:
    raise ValueError("no evaluated rows (all weights are zero)")
  out: dict[str, float] = {}
  for k in ks:
    hit = ranks < k
    out[f"hr@{k}"] = float((w * hit).sum() / n)
    out[f"ndcg@{k}"] = float((w * hit / np.log2(ranks + 2.0)).sum() / n)
  out["mrr"] = float((w / (ranks + 1.0)).sum() / n)
  out["users"] = int(round(n))
  return out


def brute_force_ranks(scores: np.ndarray, target: np.ndarray,
                      exclude: Sequence[np.ndarray] | None, num_items: int) -> np.ndarray:
  """Rank of target[u] in scores[u, 1..num_items] (columns 0 and > num_items are padding).

  Loops over users in plain numpy: slow and obviously right, for checking the
  sharded evaluator and for scoring baselines.
  """
  ranks = np.empty(target.shape[0], np.int64)
  for u in range(target.shape[0]):
    s = scores[u, 1:num_items + 1].astype(np.float64).copy()
    t = int(target[u])
    if exclude is not None:
      ex = np.asarray(exclude[u], np.int64)
      ex = ex[(ex > 0) & (ex != t)]
      s[ex - 1] = -np.inf
    ts = s[t - 1]
    ranks[u] = int((s > ts).sum() + (s == ts).sum() - 1)
  return ranks


def popularity_metrics(popularity: np.ndarray, examples, exclude_history: bool,
                       num_items: int) -> dict[str, float]:
  """The most-popular baseline under the same protocol: every user gets the item
  counts of the training prefixes as scores (ties broken against the target)."""
  scores = np.broadcast_to(popularity[None].astype(np.float64),
                           (len(examples), popularity.shape[0]))
  exclude = [examples.history_of(r) for r in range(len(examples))] if exclude_history else None
  return metrics_from_ranks(brute_force_ranks(scores, examples.target, exclude, num_items))
