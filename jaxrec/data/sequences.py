"""Interactions -> chronological per-user item sequences -> leave-one-out splits.

Items are re-indexed 1..N in order of their original id (0 is padding), so the
same file always gives the same ids. Per user, interactions are ordered by
timestamp with ties broken by file order (a stable sort), which is what makes the
SASRec text format (already chronological) and the MovieLens files agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.config import HOLDOUTS, has_validation
from jaxrec.data.loaders import DataFormatError, Interactions

PAD = 0


def min_eval_len(holdout: str) -> int:
  """Interactions a user needs to be evaluated: one to train on, plus the held-out."""
  if holdout not in HOLDOUTS:
    raise ValueError(f"holdout = {holdout!r}; valid values are {', '.join(HOLDOUTS)}")
  return HOLDOUTS[holdout] + 1


@dataclasses.dataclass(frozen=True)
class Sequences:
  """All users' item sequences in CSR form (`items[offsets[u]:offsets[u+1]]`)."""
  offsets: np.ndarray        # int64 [num_users + 1]
  items: np.ndarray          # int32 [total], ids in 1..num_items
  num_items: int
  user_ids: np.ndarray       # original user id per row
  item_ids: np.ndarray       # original item id per new id; item_ids[0] is unused
  source: str
  timestamps: np.ndarray | None = None  # int64 [total] seconds, when the file has them

  @property
  def num_users(self) -> int:
    return int(self.offsets.shape[0] - 1)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def user(self, u: int) -> np.ndarray:
    return self.items[self.offsets[u]:self.offsets[u + 1]]

  def user_times(self, u: int) -> np.ndarray | None:
    return None if self.timestamps is None else self.timestamps[self.offsets[u]:self.offsets[u + 1]]

  def describe(self) -> str:
    lengths = self.lengths
    return (f"{self.num_users} users, {self.num_items} items, {int(lengths.sum())} "
            f"interactions (median {int(np.median(lengths)) if len(lengths) else 0} per user)")


def kcore(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
  """Boolean mask of interactions kept by the iterative k-core on users and items."""
  keep = np.ones(user.shape[0], dtype=bool)
  if k <= 1:
    return keep
  while True:
    u, i = user[keep], item[keep]
    _, u_inv, u_cnt = np.unique(u, return_inverse=True, return_counts=True)
    _, i_inv, i_cnt = np.unique(i, return_inverse=True, return_counts=True)
    ok = (u_cnt[u_inv] >= k) & (i_cnt[i_inv] >= k)
    if ok.all():
      return keep
    idx = np.flatnonzero(keep)
    keep[idx[~ok]] = False


def build_sequences(inter: Interactions, kcore_k: int = 0) -> Sequences:
  """Orders, filters and re-indexes interactions into per-user sequences."""
  if len(inter) == 0:
    raise DataFormatError(f"{inter.source}: no interactions in the file")
  keep = kcore(inter.user, inter.item, kcore_k)
  user, item, ts = inter.user[keep], inter.item[keep], inter.timestamp[keep]
  line = np.flatnonzero(keep)
  if user.shape[0] == 0:
    raise DataFormatError(
        f"{inter.source}: no interactions left after the {kcore_k}-core filter "
        f"({len(inter)} before); lower config.data.kcore")
  order = np.lexsort((line, ts, user))  # user, then time, then file order
  user, item, ts = user[order], item[order], ts[order]
  item_ids, new_item = np.unique(item, return_inverse=True)
  user_ids, user_start = np.unique(user, return_index=True)
  offsets = np.append(user_start, user.shape[0]).astype(np.int64)
  return Sequences(
      offsets=offsets,
      items=(new_item + 1).astype(np.int32),
      num_items=int(item_ids.shape[0]),
      user_ids=user_ids,
      item_ids=np.concatenate([[-1], item_ids]),
      source=inter.source,
      timestamps=ts.astype(np.int64) if inter.has_time else None,
  )


class Windows:
  """Random access to training windows: window i is 2 to max_len + 1 consecutive items
  of one user (inputs: all but the last; targets: all but the first). Subclasses
  hold them in memory (TrainExamples) or read them from disk (data/store.py)."""
  max_len: int
  has_time: bool

  def __len__(self) -> int:
    return int(self.lengths.shape[0])

  @property
  def lengths(self) -> np.ndarray:
    """Tokens (inputs = targets) per window."""
    raise NotImplementedError

  def example(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def example_times(self, i: int) -> np.ndarray | None:
    raise NotImplementedError

  def padded(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """One window per row, left-padded to max_len: inputs, targets (and timestamps)."""
    t = self.max_len
    out = {"inputs": np.zeros((len(idx), t), np.int32),
           "targets": np.zeros((len(idx), t), np.int32)}
    if self.has_time:   # each input's time, and the time of the item it predicts
      out["timestamps"] = np.zeros((len(idx), t), np.int64)
      out["target_times"] = np.zeros((len(idx), t), np.int64)
    for r, i in enumerate(idx):
      seq = self.example(i)
      n = seq.shape[0] - 1
      out["inputs"][r, t - n:] = seq[:-1]
      out["targets"][r, t - n:] = seq[1:]
      if self.has_time:
        times = self.example_times(i)
        out["timestamps"][r, t - n:] = times[:-1]
        out["target_times"][r, t - n:] = times[1:]
    return out

  def tokens(self, idx: np.ndarray) -> int:
    return int(self.lengths[idx].sum())


@dataclasses.dataclass(frozen=True)
class TrainExamples(Windows):
  """Training windows in memory, CSR: window i is items[offsets[i]:offsets[i+1]].
  Kept unpadded so rows can be packed."""
  offsets: np.ndarray               # int64 [E + 1]
  items: np.ndarray                 # int32 [total]
  max_len: int
  timestamps: np.ndarray | None = None   # int64 [total], aligned with items

  @property
  def has_time(self) -> bool:
    return self.timestamps is not None

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets) - 1

  def example(self, i: int) -> np.ndarray:
    return self.items[self.offsets[i]:self.offsets[i + 1]]

  def example_times(self, i: int) -> np.ndarray | None:
    return None if self.timestamps is None else self.timestamps[self.offsets[i]:self.offsets[i + 1]]


@dataclasses.dataclass(frozen=True)
class EvalExamples:
  """One row per evaluated user: the last max_len history items and the held-out item."""
  inputs: np.ndarray          # int32 [U, max_len]
  target: np.ndarray          # int32 [U]
  history_offsets: np.ndarray  # CSR over `history`: the full history (for exclusion)
  history: np.ndarray
  users: np.ndarray           # row index into Sequences
  timestamps: np.ndarray | None = None   # int64 [U, max_len] of the inputs, when known
  target_time: np.ndarray | None = None  # int64 [U] of the held-out item, when known

  def __len__(self) -> int:
    return int(self.target.shape[0])

  def history_of(self, r: int) -> np.ndarray:
    return self.history[self.history_offsets[r]:self.history_offsets[r + 1]]


def train_prefix_end(lengths: np.ndarray, holdout: str = "valid_test") -> np.ndarray:
  """Index where each user's training prefix ends: the held-out items (HOLDOUTS) are
  cut for users that can be evaluated, none for shorter users."""
  return np.where(lengths >= min_eval_len(holdout), lengths - HOLDOUTS[holdout], lengths)


def window_ends(n: int, max_len: int, stride: int) -> list[int]:
  """Ends of training windows over a prefix of length n: the last window always,
  earlier ones every `stride` items back while they reach before the first window."""
  ends = [n]
  if stride > 0:
    e = n - stride
    while e > max_len + 1:
      ends.append(e)
      e -= stride
    if ends[-1] > max_len + 1 and e >= 2:
      ends.append(max_len + 1)
  return ends


def train_examples(seqs: Sequences, max_len: int, window_stride: int = 0,
                   holdout: str = "valid_test") -> TrainExamples:
  """SASRec-CE training windows from each user's training prefix."""
  ends = train_prefix_end(seqs.lengths, holdout)
  pieces, times, sizes = [], [], []
  for u in range(seqs.num_users):
    prefix = seqs.user(u)[:ends[u]]
    if prefix.shape[0] < 2:
      continue
    stamps = seqs.user_times(u)
    for e in window_ends(prefix.shape[0], max_len, window_stride):
      lo = max(0, e - max_len - 1)
      pieces.append(prefix[lo:e])
      sizes.append(e - lo)
      if stamps is not None:
        times.append(stamps[lo:e])
  if not pieces:
    raise DataFormatError(
        f"{seqs.source}: no user has two training interactions; nothing to train on")
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return TrainExamples(offsets, np.concatenate(pieces).astype(np.int32), max_len,
                       np.concatenate(times).astype(np.int64) if times else None)


def eval_examples(seqs: Sequences, split: str, max_len: int, max_users: int = 0,
                  holdout: str = "valid_test") -> EvalExamples:
  """Leave-one-out: `valid` predicts the second-to-last item, `test` the last."""
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
  need = min_eval_len(holdout)   # first: it names a bad holdout
  if split == "valid" and not has_validation(holdout):
    raise ValueError(f"holdout {holdout!r} trains on the validation item; it has no "
                     "'valid' split")
  lengths = seqs.lengths
  users = np.flatnonzero(lengths >= need)
  if max_users > 0:
    users = users[:max_users]
  if users.shape[0] == 0:
    raise DataFormatError(
        f"{seqs.source}: no user has the {need} interactions leave-one-out needs")
  inputs, target, hist, times, target_time = [], [], [], [], []
  for u in users:
    s = seqs.user(u)
    cut = s.shape[0] - (2 if split == "valid" else 1)
    history = s[:cut]
    inputs.append(_left_pad(history[-max_len:], max_len))
    target.append(s[cut])
    hist.append(history)
    if seqs.timestamps is not None:
      stamps = seqs.user_times(u)
      times.append(_left_pad(stamps[:cut][-max_len:], max_len, np.int64))
      target_time.append(stamps[cut])
  h_off = np.concatenate([[0], np.cumsum([h.shape[0] for h in hist])]).astype(np.int64)
  return EvalExamples(np.stack(inputs), np.asarray(target, np.int32), h_off,
                      np.concatenate(hist).astype(np.int32), users,
                      np.stack(times) if times else None,
                      np.asarray(target_time, np.int64) if times else None)


def item_popularity(seqs: Sequences, holdout: str = "valid_test") -> np.ndarray:
  """Training-prefix interaction counts per item id (index 0 = padding, count 0)."""
  ends = train_prefix_end(seqs.lengths, holdout)
  mask = np.arange(seqs.items.shape[0]) < np.repeat(seqs.offsets[:-1] + ends, seqs.lengths)
  return np.bincount(seqs.items[mask], minlength=seqs.num_items + 1)


def _left_pad(x: np.ndarray, n: int, dtype=np.int32) -> np.ndarray:
  out = np.zeros(n, dtype)
  if x.shape[0]:
    out[-x.shape[0]:] = x[-n:]
  return out
