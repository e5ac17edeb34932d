"""Real datasets -> per-user sequences -> training windows and evaluation rows.

A dataset is read from an interaction file (MovieLens, SASRec format) into memory,
or from a folder prepared once on disk by `experiments.prepare_data` (data/store.py)
when it is bigger than a host's RAM; either way training sees the same windows.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from jaxrec.config import has_validation
from jaxrec.data import store
from jaxrec.data.loaders import DataFormatError, Interactions, load_interactions
from jaxrec.data.sequences import (EvalExamples, Sequences, TrainExamples, Windows,
                                   build_sequences, eval_examples, item_popularity,
                                   train_examples)


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Windows
  valid: EvalExamples | None   # None when the validation item is trained on (holdout 'test')
  test: EvalExamples
  num_items: int
  popularity: np.ndarray    # training-prefix counts per item id (0 = padding)
  description: str
  source: str
  has_time: bool            # real timestamps (MovieLens files), not only an order
  item_ids: np.ndarray      # original item id per internal id (index 0: padding)
  user_ids: np.ndarray      # original user id per sequence (EvalExamples.users index it)


def from_sequences(seqs: Sequences, max_len: int, window_stride: int = 0,
                   eval_max_users: int = 0, holdout: str = "valid_test") -> Dataset:
  """The splits of `holdout` (config.HOLDOUTS): training windows end before the
  held-out items."""
  valid = None
  if has_validation(holdout):
    valid = eval_examples(seqs, "valid", max_len, eval_max_users, holdout)
  return Dataset(
      train=train_examples(seqs, max_len, window_stride, holdout),
      valid=valid,
      test=eval_examples(seqs, "test", max_len, eval_max_users, holdout),
      num_items=seqs.num_items, popularity=item_popularity(seqs, holdout),
      description=seqs.describe(), source=seqs.source,
      has_time=seqs.timestamps is not None, item_ids=seqs.item_ids, user_ids=seqs.user_ids)


def load_dataset(data: ml_collections.ConfigDict, eval_max_users: int = 0) -> Dataset:
  """Reads, orders, filters and splits the dataset a config names (a file, or a
  folder written by experiments.prepare_data)."""
  if store.is_prepared(data.path):
    if data.holdout != "valid_test":
      raise DataFormatError(
          f"config.data.holdout = {data.holdout!r}, but {data.path} was prepared with the "
          "validation and test items held out (experiments.prepare_data writes "
          "'valid_test' splits); train from the interaction file, or use 'valid_test'")
    parts = store.read(data.path)
    if parts["train"].max_len != data.max_len:
      raise DataFormatError(
          f"{data.path} was prepared with max_len {parts['train'].max_len}; "
          f"config.data.max_len = {data.max_len}: prepare it again or use that length")
    if eval_max_users > 0:
      parts["valid"], parts["test"] = (_first(parts[k], eval_max_users)
                                       for k in ("valid", "test"))
    return Dataset(**parts)
  seqs = build_sequences(load_interactions(data.format, data.path), data.kcore)
  return from_sequences(seqs, data.max_len, data.window_stride, eval_max_users,
                        data.holdout)


def _first(ex: EvalExamples, n: int) -> EvalExamples:
  """The first n users of an evaluation split."""
  n = min(n, len(ex))
  end = ex.history_offsets[n]
  return EvalExamples(ex.inputs[:n], ex.target[:n], ex.history_offsets[:n + 1],
                      ex.history[:end], ex.users[:n],
                      None if ex.timestamps is None else ex.timestamps[:n])


__all__ = ["DataFormatError", "Dataset", "EvalExamples", "Interactions", "Sequences",
           "TrainExamples", "Windows", "from_sequences", "item_popularity", "load_dataset"]
