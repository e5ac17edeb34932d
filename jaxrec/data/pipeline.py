"""The training input as a grain pipeline: this process's rows of each global batch,
prepared on background threads while the devices compute, with an iterator state
that goes into the orbax checkpoint.

Why grain (not a hand-written thread and queue): its iterators carry a
checkpointable state through prefetching (the state handed to the checkpoint is
that of the next batch the loop will *consume*, not of what the prefetch thread has
read ahead), it has an orbax handler for that state, and its thread/process
prefetch is tuned and tested. The batches themselves come from `TrainStream` (a
pure function of the step), so the state is small: the step and where the current
epoch starts.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxrec.data.batches import TrainStream


class _BatchIterator(grain.DatasetIterator):
  def __init__(self, stream: TrainStream, rows: slice, step: int):
    super().__init__()
    self.stream, self.rows, self.step = stream, rows, step

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.stream.host_batch(self.step, self.rows)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {k: int(v) for k, v in self.stream.position(self.step).items()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.seed_position(int(state["epoch"]), int(state["epoch_start"]))
    self.step = int(state["step"])


class _Batches(grain.IterDataset):
  def __init__(self, stream: TrainStream, rows: slice, step: int):
    super().__init__()
    self.stream, self.rows, self.step = stream, rows, step

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self.stream, self.rows, self.step)


def train_batches(stream: TrainStream, rows: slice, step: int = 0,
                  prefetch: int = 2) -> grain.DatasetIterator:
  """Host batches from global step `step` on, `prefetch` of them prepared ahead on a
  background thread (0: in the calling thread)."""
  ds: grain.IterDataset = _Batches(stream, rows, step)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return iter(ds)


class FrozenState(grain.DatasetIterator):
  """A snapshot of an iterator's state, for an asynchronous checkpoint save: the
  loop goes on consuming batches while orbax writes."""

  def __init__(self, state: dict[str, Any]):
    super().__init__()
    self._state = dict(state)

  def __next__(self):
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._state = dict(state)
