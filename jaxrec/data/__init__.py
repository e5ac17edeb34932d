"""Real datasets -> per-user sequences -> host-local batches -> global jax.Arrays."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxrec.data.loaders import DataFormatError, Interactions, load_interactions
from jaxrec.data.sequences import (EvalExamples, Sequences, TrainExamples, build_sequences,
                                   eval_examples, item_popularity, train_examples)


@dataclasses.dataclass(frozen=True)
class Dataset:
  sequences: Sequences
  train: TrainExamples
  valid: EvalExamples
  test: EvalExamples

  @property
  def num_items(self) -> int:
    return self.sequences.num_items


def load_dataset(data: ml_collections.ConfigDict, eval_max_users: int = 0) -> Dataset:
  """Reads, orders, filters and splits the dataset a config names."""
  seqs = build_sequences(load_interactions(data.format, data.path), data.kcore)
  return Dataset(
      sequences=seqs,
      train=train_examples(seqs, data.max_len, data.window_stride),
      valid=eval_examples(seqs, "valid", data.max_len, eval_max_users),
      test=eval_examples(seqs, "test", data.max_len, eval_max_users),
  )


__all__ = ["DataFormatError", "Dataset", "EvalExamples", "Interactions", "Sequences",
           "TrainExamples", "item_popularity", "load_dataset"]
