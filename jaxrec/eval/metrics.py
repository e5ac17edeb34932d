"""Ranking metrics from 0-based target ranks, and a brute-force numpy reference.

Protocol (DESIGN.md): leave-one-out, full ranking over the whole catalogue, the
user's earlier items removed from the candidates as `eval.exclude` says (the target
itself is never removed), ties counted against the target.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxrec.config import check_exclusion

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


def popularity_metrics(popularity: np.ndarray, examples, exclude: str,
                       num_items: int) -> dict[str, float]:
  """The most-popular baseline under the same protocol: every user gets the item
  counts of the training prefixes as scores (ties broken against the target).

  Vectorised: every user shares the scores, so a target's rank is the number of
  items scoring >= it (a binary search in the sorted scores), minus those of the
  user's (de-duplicated) history items that count there."""
  check_exclusion(exclude)
  pop = np.asarray(popularity[:num_items + 1], np.float64)
  items = pop[1:]
  sorted_pop = np.sort(items)
  target = np.asarray(examples.target, np.int64)
  t_pop = pop[target]
  at_least = items.shape[0] - np.searchsorted(sorted_pop, t_pop, side="left")
  ranks = at_least - 1                      # everything >= the target but itself
  if exclude != "none":
    if exclude == "input":     # the input window: each row's non-padding inputs
      inputs = np.asarray(examples.inputs, np.int64)
      users = np.nonzero(inputs > 0)[0]
      hist = inputs[inputs > 0]
    else:
      offsets = np.asarray(examples.history_offsets, np.int64)
      users = np.repeat(np.arange(target.shape[0]), np.diff(offsets))
      hist = np.asarray(examples.history, np.int64)
    key = users * (num_items + 1) + hist
    keep = (hist > 0) & (hist != target[users])
    _, first = np.unique(key, return_index=True)   # a history item counts once
    unique = np.zeros(hist.shape[0], bool)
    unique[first] = True
    drop = keep & unique & (pop[hist] >= t_pop[users])
    ranks = ranks - np.bincount(users[drop], minlength=target.shape[0])
  return metrics_from_ranks(ranks)
