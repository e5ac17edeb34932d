import numpy as np
import pytest

from jaxrec.data import load_dataset
from jaxrec.data.batches import TrainStream, eval_batches, process_rows, to_global
from jaxrec.data.loaders import (DataFormatError, load_interactions, read_movielens_csv,
                                 read_movielens_dat, read_sasrec)
from jaxrec.data.sequences import (build_sequences, eval_examples, item_popularity, kcore,
                                   train_examples, window_ends)
from jaxrec.mesh import make_mesh
from tests.helpers import tiny_config


def write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_movielens_csv(tmp_path):
  p = write(tmp_path, "ratings.csv",
            "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5,50\n2,10,5.0,7\n")
  inter = read_movielens_csv(p)
  assert inter.user.tolist() == [1, 1, 2]
  assert inter.item.tolist() == [10, 20, 10]
  assert inter.timestamp.tolist() == [100, 50, 7]


def test_movielens_dat(tmp_path):
  p = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
  inter = read_movielens_dat(p)
  assert inter.item.tolist() == [1193, 661]
  assert inter.timestamp.tolist() == [978300760, 978302109]


def test_sasrec_uses_line_order_as_time(tmp_path):
  p = write(tmp_path, "x.txt", "1 5\n1 3\n2 5\n")
  inter = read_sasrec(p)
  assert inter.timestamp.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name, text, reader, line, needle", [
    ("r.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n1,x,3.0,5\n", read_movielens_csv,
     3, "field 'x' is not an integer"),
    ("r.csv", "userId,movieId,rating,timestamp\n1,2,3.0\n", read_movielens_csv, 2,
     "expected 4 fields"),
    ("r.dat", "1::2::3::4\n1::2::3\n", read_movielens_dat, 2, "expected 4 fields"),
    ("r.dat", "1::2::3::4\n1::2::3::abc\n", read_movielens_dat, 2, "'abc' is not an integer"),
    ("s.txt", "1 2\n1 2 3\n", read_sasrec, 2, "expected 2 fields"),
    ("s.txt", "1 2\n1 2\nfoo bar\n", read_sasrec, 3, "'foo' is not an integer"),
    ("s.txt", "1 2\n1 2.5\n", read_sasrec, 2, "'2.5' is not an integer"),
])
def test_malformed_line_names_file_line_and_content(tmp_path, name, text, reader, line, needle):
  p = write(tmp_path, name, text)
  with pytest.raises(DataFormatError) as err:
    reader(p)
  msg = str(err.value)
  assert f"{p}:{line}:" in msg and needle in msg
  bad = text.splitlines()[line - 1]
  assert repr(bad) in msg


def test_bad_csv_header(tmp_path):
  p = write(tmp_path, "r.csv", "user,item\n1,2\n")
  with pytest.raises(DataFormatError, match="header"):
    read_movielens_csv(p)


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_interactions("sasrec", str(tmp_path / "nope.txt"))
  with pytest.raises(DataFormatError, match="cannot tell the format"):
    load_interactions("auto", str(write(tmp_path, "x.json", "{}")))
  with pytest.raises(DataFormatError, match="needs config.data.path"):
    load_interactions("sasrec", "")


def test_order_is_by_time_with_stable_tie_break(tmp_path):
  # user 7: items 30 (t=5), 10 (t=5, later line), 20 (t=1) -> 20, 30, 10
  p = write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n"
            "7,30,1,5\n7,10,1,5\n7,20,1,1\n3,10,1,9\n")
  seqs = build_sequences(read_movielens_csv(p))
  assert seqs.user_ids.tolist() == [3, 7]
  # items re-indexed 1..N in original-id order: 10->1, 20->2, 30->3
  assert seqs.item_ids[1:].tolist() == [10, 20, 30]
  assert seqs.user(1).tolist() == [2, 3, 1]
  assert seqs.user(0).tolist() == [1]


def test_kcore_is_iterative():
  # item 9 has 2 users; removing user 3 (1 interaction) drops item 9 below 2, then user 2
  user = np.array([1, 1, 1, 2, 2, 3, 4, 4])
  item = np.array([5, 6, 7, 5, 9, 9, 6, 7])
  keep = kcore(user, item, 2)
  kept = set(zip(user[keep].tolist(), item[keep].tolist()))
  assert kept == {(1, 6), (1, 7), (4, 6), (4, 7)}


def test_empty_after_filter_is_a_clear_error(tmp_path):
  p = write(tmp_path, "s.txt", "1 1\n2 2\n3 3\n")
  with pytest.raises(DataFormatError, match="no interactions left after the 5-core"):
    build_sequences(read_sasrec(p), kcore_k=5)


def test_leave_one_out_split_and_windows(tmp_path):
  lines = "".join(f"1 {i}\n" for i in range(1, 13))  # user with 12 items
  lines += "2 1\n2 2\n"                              # user too short to evaluate
  seqs = build_sequences(read_sasrec(write(tmp_path, "s.txt", lines)))
  ex = train_examples(seqs, max_len=4)
  rows = ex.padded(np.arange(len(ex)))
  # user 1: training prefix is items 1..10 -> last window inputs 6..9, targets 7..10
  assert rows["inputs"].tolist()[0] == [6, 7, 8, 9] and rows["targets"].tolist()[0] == [7, 8, 9, 10]
  # user 2 (2 items, no eval) trains on its whole sequence, left padded
  assert rows["inputs"].tolist()[1] == [0, 0, 0, 1] and rows["targets"].tolist()[1] == [0, 0, 0, 2]
  assert ex.lengths.tolist() == [4, 1]
  valid = eval_examples(seqs, "valid", max_len=4)
  test = eval_examples(seqs, "test", max_len=4)
  assert valid.target.tolist() == [11] and test.target.tolist() == [12]
  assert valid.inputs.tolist() == [[7, 8, 9, 10]] and test.inputs.tolist() == [[8, 9, 10, 11]]
  assert valid.history_of(0).tolist() == list(range(1, 11))
  assert test.history_of(0).tolist() == list(range(1, 12))
  windows = train_examples(seqs, max_len=4, window_stride=4)
  targets = windows.padded(np.arange(len(windows)))["targets"]
  covered = set(targets[targets > 0].tolist())
  assert covered == set(range(2, 11))  # every training target of both users appears


def test_holdout_test_trains_through_the_validation_item(tmp_path):
  """data.holdout='test' (generative-recommenders' published split): the training
  prefix keeps the second-to-last item, only the last is held out, there is no
  validation split, and a 2-item user is evaluated."""
  lines = "".join(f"1 {i}\n" for i in range(1, 13)) + "2 1\n2 2\n"
  path = write(tmp_path, "s.txt", lines)
  seqs = build_sequences(read_sasrec(path))
  windows = train_examples(seqs, max_len=4, holdout="test")
  assert len(windows) == 1    # user 2 keeps one item to train on: no window
  assert windows.padded(np.arange(1))["targets"].tolist() == [[8, 9, 10, 11]]  # through 11
  test = eval_examples(seqs, "test", max_len=4, holdout="test")
  assert test.target.tolist() == [12, 2] and test.inputs.tolist()[1] == [0, 0, 0, 1]
  with pytest.raises(ValueError, match="no 'valid' split"):
    eval_examples(seqs, "valid", max_len=4, holdout="test")
  assert item_popularity(seqs, "test").tolist()[11] == 1   # item 11 is trained on
  assert item_popularity(seqs).tolist()[11] == 0
  config = tiny_config(**{"data.path": str(path), "data.max_len": 4,
                          "data.holdout": "test"})
  data = load_dataset(config.data)
  assert data.valid is None and data.test.target.tolist() == [12, 2]


def test_window_ends():
  assert window_ends(10, 4, 0) == [10]
  assert window_ends(20, 4, 5) == [20, 15, 10, 5]
  assert window_ends(4, 4, 2) == [4]


def test_popularity_counts_training_prefix_only(tmp_path):
  lines = "1 1\n1 2\n1 3\n1 3\n2 1\n2 3\n2 2\n"
  seqs = build_sequences(read_sasrec(write(tmp_path, "s.txt", lines)))
  # user 1 train prefix: [1, 2]; user 2 train prefix: [1]
  assert item_popularity(seqs).tolist() == [0, 2, 1, 0]


def test_train_stream_is_deterministic_and_crosses_epochs():
  config = tiny_config()
  ds = load_dataset(config.data)
  stream = TrainStream(ds.train, 64, seed=3)
  n = len(ds.train)
  per_epoch = np.concatenate([stream.indices(k) for k in range(n // 64 + 2)])
  first = per_epoch[:n]
  assert sorted(first.tolist()) == list(range(n))  # epoch 0 is a permutation
  again = TrainStream(ds.train, 64, seed=3)
  assert np.array_equal(again.indices(5), stream.indices(5))
  assert not np.array_equal(TrainStream(ds.train, 64, seed=4).indices(0), stream.indices(0))


def test_global_batch_arrays_are_sharded_over_data():
  mesh = make_mesh("data:4,tensor:2")
  rows = process_rows(mesh, 16)
  assert rows == slice(0, 16)
  host = {"inputs": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  arr = to_global(mesh, host, 16)["inputs"]
  assert arr.shape == (16, 3)
  assert len(arr.sharding.device_set) == 8
  shard = arr.addressable_shards[0]
  assert shard.data.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(arr), host["inputs"])


def test_eval_batches_pad_and_exclude(tmp_path):
  lines = "".join(f"1 {i}\n" for i in range(1, 6)) + "".join(f"2 {i}\n" for i in (4, 5, 6))
  seqs = build_sequences(read_sasrec(write(tmp_path, "s.txt", lines)))
  ex = eval_examples(seqs, "test", max_len=3)
  (batch,) = list(eval_batches(ex, 4, exclude="history"))
  assert batch["weight"].tolist() == [1, 1, 0, 0]
  assert batch["exclude"].shape == (4, 4)
  assert batch["exclude"][0].tolist() == [1, 2, 3, 4]
  assert batch["exclude"][1].tolist() == [4, 5, 0, 0]
  (window,) = list(eval_batches(ex, 4, exclude="input"))
  np.testing.assert_array_equal(window["exclude"], window["inputs"])   # the last max_len
  assert window["exclude"][0].tolist() == [2, 3, 4]
  (kept,) = list(eval_batches(ex, 4, exclude="none"))
  assert not kept["exclude"].any()                                      # nothing removed
  with pytest.raises(ValueError, match="exclude = True; valid values are history, input, none"):
    list(eval_batches(ex, 4, exclude=True))                             # the old bool


def test_embedded_dataset_loads():
  ds = load_dataset(tiny_config().data)
  assert ds.num_items == 9724 and ds.description.startswith("610 users")
  assert len(ds.valid) == len(ds.test) == 610


def synthetic_log(path, users=120, items=60, seed=0):
  rng = np.random.default_rng(seed)
  lines = []
  for u in range(1, users + 1):
    for i in rng.integers(1, items + 1, int(rng.integers(3, 30))):
      lines.append(f"{u} {i}\n")
  path.write_text("".join(lines))
  return path


def test_prepared_shards_give_the_same_windows_and_batches(tmp_path):
  """A dataset written to many ArrayRecord shards reads back the windows, evaluation
  rows and popularity of the in-memory path, and the stream's batches match."""
  import subprocess
  import sys
  src = synthetic_log(tmp_path / "log.txt")
  out = tmp_path / "prepared"
  result = subprocess.run([sys.executable, "-m", "experiments.prepare_data",
                           f"--input={src}", f"--output={out}", "--max_len=8", "--shards=7"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(list(out.glob("train-*-of-00007.array_record"))) == 7
  config = tiny_config(**{"data.path": str(src), "data.max_len": 8})
  memory = load_dataset(config.data)
  config.data.path = str(out)
  stored = load_dataset(config.data)
  assert len(stored.train) == len(memory.train) and stored.num_items == memory.num_items
  assert all(np.array_equal(stored.train.example(i), memory.train.example(i))
             for i in range(len(memory.train)))
  assert np.array_equal(stored.test.target, memory.test.target)
  assert np.array_equal(stored.popularity, memory.popularity)
  for packing in ("none", "greedy"):
    a = TrainStream(memory.train, 16, 3, packing).host_batch(5, slice(4, 12))
    b = TrainStream(stored.train, 16, 3, packing).host_batch(5, slice(4, 12))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_prepared_data_errors_name_the_bad_part(tmp_path):
  from jaxrec.data import store
  config = tiny_config(**{"data.path": str(synthetic_log(tmp_path / "log.txt")),
                          "data.max_len": 8})
  data = load_dataset(config.data)
  args = (data.train, data.valid, data.test, data.num_items, data.popularity, "d", "s")
  ids = {"item_ids": data.item_ids, "user_ids": data.user_ids}
  with pytest.raises(ValueError, match="would leave shards empty"):
    store.write(tmp_path / "x", *args, shards=len(data.train) + 1, **ids)
  store.write(tmp_path / "ok", *args, shards=3, **ids)
  config.data.path = str(tmp_path / "ok")
  config.data.holdout = "test"
  with pytest.raises(DataFormatError, match="holdout = 'test'.*prepared with the validation"):
    load_dataset(config.data)
  config.data.holdout = "valid_test"
  config.data.max_len = 9
  with pytest.raises(DataFormatError, match="prepared with max_len 8"):
    load_dataset(config.data)
  config.data.max_len = 8
  (tmp_path / "ok" / "train-00001-of-00003.array_record").write_bytes(b"")
  with pytest.raises(DataFormatError, match="shard train-00001-of-00003.array_record is empty"):
    load_dataset(config.data)
  store.write(tmp_path / "bad", *args, shards=2, **ids)
  test = dict(np.load(tmp_path / "bad" / "test.npz"))
  test["target"][0] = data.num_items + 5
  np.savez(tmp_path / "bad" / "test.npz", **test)
  config.data.path = str(tmp_path / "bad")
  with pytest.raises(DataFormatError, match=f"item id {data.num_items + 5} is out of range"):
    load_dataset(config.data)
