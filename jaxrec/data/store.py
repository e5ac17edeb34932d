"""A dataset prepared once on disk, for data bigger than a host's RAM.

`python -m experiments.prepare_data --input=... --output=DIR` writes:

  manifest.json         counts, shard files, what each array holds (the contract)
  train-NNNNN-of-MMMMM.array_record
                        one record per training window: int32 item ids, then
                        (when the data has times) int64 timestamps
  train_lengths.npy     items per window (what packing plans need, without reading)
  {valid,test}.npz      the leave-one-out evaluation rows
  popularity.npy        training-prefix interaction counts per item

Training reads windows by global index through grain's ArrayRecord source (random
access over all shards), so each process reads only the windows of its own rows of
each batch, whatever the process count, and batches are the same as with the data
in memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxrec.data.loaders import DataFormatError
from jaxrec.data.sequences import EvalExamples, TrainExamples, Windows

FORMAT = "jaxrec-prepared-v1"
MANIFEST = "manifest.json"


def is_prepared(path: str | Path) -> bool:
  return bool(path) and (Path(path) / MANIFEST).is_file()


def write(out: Path, train: TrainExamples, valid: EvalExamples, test: EvalExamples,
          num_items: int, popularity: np.ndarray, description: str, source: str,
          shards: int, item_ids: np.ndarray, user_ids: np.ndarray) -> dict:
  """Writes a prepared dataset; returns its manifest."""
  if shards < 1:
    raise ValueError(f"--shards = {shards} must be >= 1")
  if shards > len(train):
    raise ValueError(f"--shards = {shards} would leave shards empty: there are only "
                     f"{len(train)} training windows")
  out.mkdir(parents=True, exist_ok=True)
  bounds = np.linspace(0, len(train), shards + 1).astype(np.int64)
  files = []
  for s in range(shards):
    name = f"train-{s:05d}-of-{shards:05d}.array_record"
    writer = ArrayRecordWriter(str(out / name), "group_size:1")
    for i in range(bounds[s], bounds[s + 1]):
      record = train.example(i).astype(np.int32).tobytes()
      if train.has_time:
        record += train.example_times(i).astype(np.int64).tobytes()
      writer.write(record)
    writer.close()
    files.append({"file": name, "windows": int(bounds[s + 1] - bounds[s])})
  np.save(out / "train_lengths.npy", np.diff(train.offsets).astype(np.int32))
  np.save(out / "popularity.npy", popularity.astype(np.int64))
  np.save(out / "item_ids.npy", np.asarray(item_ids, np.int64))
  np.save(out / "user_ids.npy", np.asarray(user_ids, np.int64))
  for name, ex in (("valid", valid), ("test", test)):
    arrays = {f.name: getattr(ex, f.name) for f in dataclasses.fields(ex)
              if getattr(ex, f.name) is not None}
    np.savez(out / f"{name}.npz", **arrays)
  manifest = {"format": FORMAT, "num_items": int(num_items), "max_len": int(train.max_len),
              "windows": len(train), "has_time": train.has_time,
              "shards": files, "description": description, "source": source}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
  return manifest


class StoredExamples(Windows):
  """Training windows read from the ArrayRecord shards on demand."""

  def __init__(self, root: Path, manifest: dict):
    self._lengths = np.load(root / "train_lengths.npy").astype(np.int64) - 1
    self.max_len = int(manifest["max_len"])
    self.has_time = bool(manifest["has_time"])
    paths = [str(root / f["file"]) for f in manifest["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != len(self._lengths):
      raise DataFormatError(
          f"{root}: the shards hold {len(self._source)} windows but train_lengths.npy lists "
          f"{len(self._lengths)}; the prepared data is incomplete — run prepare_data again")

  @property
  def lengths(self) -> np.ndarray:
    return self._lengths

  def _record(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    raw = self._source[int(i)]
    n = int(self._lengths[i]) + 1
    items = np.frombuffer(raw[:4 * n], np.int32)
    return items, (np.frombuffer(raw[4 * n:], np.int64) if self.has_time else None)

  def example(self, i: int) -> np.ndarray:
    return self._record(i)[0]

  def example_times(self, i: int) -> np.ndarray | None:
    return self._record(i)[1]


def read(root: str | Path) -> dict:
  """The parts of a prepared dataset, validated against its manifest."""
  root = Path(root)
  manifest = json.loads((root / MANIFEST).read_text())
  if manifest.get("format") != FORMAT:
    raise DataFormatError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected "
                          f"{FORMAT!r}; prepare the data again with this version")
  for entry in manifest["shards"]:
    path = root / entry["file"]
    if not path.is_file():
      raise DataFormatError(f"{root}: shard {entry['file']} listed in the manifest is missing")
    if entry["windows"] <= 0 or path.stat().st_size == 0:
      raise DataFormatError(f"{root}: shard {entry['file']} is empty ({entry['windows']} "
                            "windows); every shard must hold training windows")
  train = StoredExamples(root, manifest)
  num_items = int(manifest["num_items"])
  evals = {}
  for name in ("valid", "test"):
    arrays = dict(np.load(root / f"{name}.npz"))
    ex = EvalExamples(**arrays)
    bad = (ex.target < 1) | (ex.target > num_items)
    if bad.any():
      raise DataFormatError(
          f"{root / (name + '.npz')}: item id {int(ex.target[bad][0])} is out of range "
          f"1..{num_items} (num_items in the manifest)")
    evals[name] = ex
  return {"train": train, "valid": evals["valid"], "test": evals["test"],
          "num_items": num_items, "popularity": np.load(root / "popularity.npy"),
          "description": manifest["description"], "source": f"{root} (prepared)",
          "has_time": manifest["has_time"], "item_ids": np.load(root / "item_ids.npy"),
          "user_ids": np.load(root / "user_ids.npy")}
