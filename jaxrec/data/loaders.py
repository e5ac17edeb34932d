"""Readers for the interaction files recommenders are benchmarked on.

Each reader returns `Interactions`: parallel arrays of user id, item id and a
timestamp (the line number for formats that are already chronological). Every
rating counts as an implicit interaction. A malformed line is an error that names
the file, the 1-based line number and the line itself; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import numpy as np

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "ml-latest-small"
EMBEDDED_RATINGS = EMBEDDED_DIR / "ratings.csv"


class DataFormatError(ValueError):
  """A data file that does not have the expected format."""


@dataclasses.dataclass(frozen=True)
class Interactions:
  user: np.ndarray       # int64 [n]
  item: np.ndarray       # int64 [n], original ids
  timestamp: np.ndarray  # int64 [n]; ties are broken by line order downstream
  source: str
  has_time: bool = True  # False: `timestamp` is only the line order (SASRec format)

  def __len__(self) -> int:
    return int(self.user.shape[0])


def read_movielens_csv(path: str | os.PathLike) -> Interactions:
  """MovieLens `ratings.csv` (ml-latest-small, ml-20m, ml-25m): userId,movieId,rating,timestamp."""
  path = _existing(path)
  with open(path, "rb") as f:
    header = f.readline().decode("utf-8", "replace").strip()
    body = f.read()
  if header.replace(" ", "").lower() != "userid,movieid,rating,timestamp":
    raise DataFormatError(
        f"{path}:1: expected the header 'userId,movieId,rating,timestamp', got {header!r}")
  cols = _parse_columns(path, body, delimiter=b",", types=(int, int, float, int),
                        first_line=2, what="userId,movieId,rating,timestamp")
  return Interactions(cols[0], cols[1], cols[3], str(path))


def read_movielens_dat(path: str | os.PathLike) -> Interactions:
  """MovieLens-1M `ratings.dat`: UserID::MovieID::Rating::Timestamp."""
  path = _existing(path)
  body = Path(path).read_bytes()
  cols = _parse_columns(path, body, delimiter=b"::", types=(int, int, float, int),
                        first_line=1, what="UserID::MovieID::Rating::Timestamp")
  return Interactions(cols[0], cols[1], cols[3], str(path))


def read_sasrec(path: str | os.PathLike) -> Interactions:
  """SASRec text format: one `user item` pair per line, chronological per user."""
  path = _existing(path)
  body = Path(path).read_bytes()
  cols = _parse_columns(path, body, delimiter=None, types=(int, int), first_line=1,
                        what="'user item'")
  order = np.arange(cols[0].shape[0], dtype=np.int64)
  return Interactions(cols[0], cols[1], order, str(path), has_time=False)


READERS = {
    "movielens_csv": read_movielens_csv,
    "movielens_dat": read_movielens_dat,
    "sasrec": read_sasrec,
}


SUFFIX_FORMATS = {".csv": "movielens_csv", ".dat": "movielens_dat", ".txt": "sasrec"}


def load_interactions(fmt: str, path: str = "") -> Interactions:
  """Reads `path` in format `fmt` ("auto": by suffix); an empty path means the
  embedded ml-latest-small ratings.csv."""
  if not path:
    if fmt not in ("auto", "movielens_csv"):
      raise DataFormatError(
          f"data format {fmt!r} needs config.data.path; only movielens_csv has an "
          "embedded default dataset")
    return read_movielens_csv(EMBEDDED_RATINGS)
  if fmt == "auto":
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
      raise DataFormatError(
          f"cannot tell the format of {path!r} from its suffix {suffix!r}; set "
          f"config.data.format to one of {sorted(READERS)}")
    fmt = SUFFIX_FORMATS[suffix]
  if fmt not in READERS:
    raise DataFormatError(
        f"unknown data format {fmt!r}; valid formats: {['auto', *sorted(READERS)]}")
  return READERS[fmt](path)


def _existing(path: str | os.PathLike) -> Path:
  p = Path(path).expanduser()
  if not p.is_file():
    hint = " (it is a directory; give the ratings file inside it)" if p.is_dir() else ""
    raise FileNotFoundError(f"dataset file {str(p)!r} does not exist{hint}")
  return p


def _parse_columns(path: Path, body: bytes, delimiter: bytes | None, types: tuple,
                   first_line: int, what: str) -> list[np.ndarray]:
  """Fast numpy parse; on any failure a line-by-line scan finds and reports the bad line."""
  n = len(types)
  text = body.replace(b"::", b",") if delimiter == b"::" else body
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # loadtxt warns on an empty file; reported later
      arr = np.loadtxt(io.BytesIO(text), delimiter=None if delimiter is None else ",",
                       dtype=np.float64, ndmin=2, comments=None, encoding="utf-8")
  except ValueError:
    arr = None
  if arr is not None and arr.size == 0:
    return [np.zeros((0,), np.int64 if t is int else np.float64) for t in types]
  if arr is not None and arr.shape[1] == n:
    cols = [arr[:, i] for i in range(n)]
    integral = all(np.all(c == np.round(c)) and np.all(np.abs(c) < 2**53)
                   for c, t in zip(cols, types) if t is int)
    if integral:
      return [c.astype(np.int64) if t is int else c for c, t in zip(cols, types)]
  _raise_first_bad_line(path, body, delimiter, types, first_line, what)
  raise DataFormatError(f"{path}: could not parse as {what}")


def _raise_first_bad_line(path, body, delimiter, types, first_line, what):
  for offset, raw in enumerate(body.split(b"\n")):
    line = raw.decode("utf-8", "replace").rstrip("\r")
    if not line.strip():
      continue  # blank lines are skipped by the fast parser too
    fields = line.split() if delimiter is None else line.split(delimiter.decode())
    if len(fields) != len(types):
      raise DataFormatError(
          f"{path}:{first_line + offset}: malformed line {line!r}: expected {len(types)} "
          f"fields ({what}), got {len(fields)}")
    for field, t in zip(fields, types):
      try:
        t(field.strip())
      except ValueError:
        kind = "an integer" if t is int else "a number"
        raise DataFormatError(
            f"{path}:{first_line + offset}: malformed line {line!r}: field {field!r} is "
            f"not {kind} (expected {what})") from None
