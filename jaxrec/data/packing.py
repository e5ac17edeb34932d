"""Packing several users' sequences into one row: a plan from lengths alone, then rows.

Real recommendation logs are long-tailed (Amazon Video: median 6 interactions per
user); one user per row of max_len is mostly padding. A greedy first-fit over the
shuffled examples puts as many as fit into each row, each a *segment* with its own
id: the model attends causally within a segment only and restarts positions per
segment (models/recommender.attention_mask), so a packed row computes exactly what
its segments would alone.

The plan depends only on the example lengths and their order, so every process
computes the same rows and materialises only its own (per-host input), and a
resumed run sees the same rows.
"""

from __future__ import annotations

import numpy as np

WINDOW = 64   # open rows first-fit may still place an example in


def first_fit(lengths: np.ndarray, order: np.ndarray, capacity: int,
              window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
  """Rows as CSR (row offsets [R + 1], example ids in placement order).

  Examples are taken in `order`; each goes to the first of the (at most `window`)
  open rows it fits in, else opens a row; when more than `window` rows are open the
  oldest is closed. Rows are emitted in the order they close, so the result is a
  pure function of (lengths, order, capacity, window).
  """
  if lengths.size and int(lengths.max()) > capacity:
    raise ValueError(f"an example of {int(lengths.max())} tokens does not fit a row of "
                     f"{capacity}")
  open_rows: list[list[int]] = []
  space: list[int] = []
  closed: list[list[int]] = []
  for i in order.tolist():
    n = int(lengths[i])
    for r, free in enumerate(space):
      if free >= n:
        open_rows[r].append(i)
        space[r] -= n
        break
    else:
      open_rows.append([i])
      space.append(capacity - n)
      if len(open_rows) > window:
        closed.append(open_rows.pop(0))
        space.pop(0)
  closed.extend(open_rows)
  offsets = np.concatenate([[0], np.cumsum([len(r) for r in closed])]).astype(np.int64)
  members = np.asarray([i for r in closed for i in r], np.int64)
  return offsets, members


def one_per_row(order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The unpacked plan: every example alone in its row."""
  return np.arange(order.shape[0] + 1, dtype=np.int64), order.astype(np.int64)


def packed_rows(examples, row_offsets: np.ndarray, members: np.ndarray, rows: np.ndarray,
                with_times: bool = False) -> dict[str, np.ndarray]:
  """Rows `rows` of a plan as arrays [len(rows), max_len]: segments laid out from the
  left, padding on the right; segment ids 1, 2, ... (0 = padding)."""
  t = examples.max_len
  out = {k: np.zeros((len(rows), t), np.int32) for k in ("inputs", "targets", "segments")}
  if with_times:
    out["timestamps"] = np.zeros((len(rows), t), np.int64)
    out["target_times"] = np.zeros((len(rows), t), np.int64)
  for r, row in enumerate(rows):
    at = 0
    for s, i in enumerate(members[row_offsets[row]:row_offsets[row + 1]]):
      seq = examples.example(i)
      n = seq.shape[0] - 1
      out["inputs"][r, at:at + n] = seq[:-1]
      out["targets"][r, at:at + n] = seq[1:]
      out["segments"][r, at:at + n] = s + 1
      if with_times:
        times = examples.example_times(i)
        out["timestamps"][r, at:at + n] = times[:-1]
        out["target_times"][r, at:at + n] = times[1:]
      at += n
  return out


def fill_rate(examples, row_offsets: np.ndarray, members: np.ndarray) -> float:
  """Real tokens / positions of a plan's rows."""
  rows = row_offsets.shape[0] - 1
  return float(examples.lengths[members].sum()) / max(rows * examples.max_len, 1)
