"""Write a dataset once to disk in the form training reads windows from on demand.

  python -m experiments.prepare_data --input=/path/to/ratings.dat --output=data/ml1m-200 \
      --max_len=200 --shards=16
  python -m experiments.train --config=experiments/configs/ml1m.py \
      --config.data.path=data/ml1m-200

For interaction logs bigger than a host's RAM: the training windows go into
ArrayRecord shards read by grain's random-access source (jaxrec/data/store.py), so
every process reads only the windows of its own rows. The evaluation rows and item
popularity are written next to them. Prints what it wrote.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from experiments import runtime

_INPUT = flags.DEFINE_string("input", None, "Interaction file (MovieLens csv/dat, SASRec txt).")
_FORMAT = flags.DEFINE_string("format", "auto", "auto | movielens_csv | movielens_dat | sasrec")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (created).")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "Positions per training window (data.max_len).")
_STRIDE = flags.DEFINE_integer("window_stride", 0, "Extra windows every N items back (0: off).")
_KCORE = flags.DEFINE_integer("kcore", 0, "Iterative k-core filter (0/1: off).")
_SHARDS = flags.DEFINE_integer("shards", 8, "ArrayRecord shards for the training windows.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  runtime.setup()
  from jaxrec.data import from_sequences, store
  from jaxrec.data.loaders import load_interactions
  from jaxrec.data.sequences import build_sequences

  start = time.perf_counter()
  with runtime.user_errors():
    seqs = build_sequences(load_interactions(_FORMAT.value, _INPUT.value), _KCORE.value)
    data = from_sequences(seqs, _MAX_LEN.value, _STRIDE.value)
    manifest = store.write(Path(_OUTPUT.value), data.train, data.valid, data.test,
                           data.num_items, data.popularity, data.description, data.source,
                           _SHARDS.value, data.item_ids, data.user_ids)
  print(f"{data.description} -> {manifest['windows']} training windows of up to "
        f"{manifest['max_len']} positions in {len(manifest['shards'])} shards, "
        f"{len(data.valid)} evaluation users; timestamps: {manifest['has_time']}; "
        f"{time.perf_counter() - start:.1f}s")
  print(f"wrote {_OUTPUT.value}; train with --config.data.path={_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
