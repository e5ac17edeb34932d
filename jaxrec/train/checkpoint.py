"""Orbax checkpoints of the whole TrainState plus a JSON record of what it is.

Restores go through an abstract state that carries the *target* mesh's
shardings, which is what lets a run saved on one mesh resume on another
(train/remesh.py converts layouts). Before any array is read, the saved
parameter shapes are compared with the current model's, so a checkpoint from
another model fails with the first mismatching parameter named instead of an
opaque tensorstore error. Orbax writes each step to a temporary folder and
renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from jaxrec.data.pipeline import FrozenState

FORMAT_VERSION = 1
# A read failing with one of these may succeed if tried again (a network file system,
# an overloaded bucket mount): retried with backoff, never taken as corruption.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY,
                    errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETDOWN, errno.ENETUNREACH,
                    errno.EHOSTUNREACH, errno.EINTR}
READ_ATTEMPTS = 4
RETRY_BACKOFF_S = 1.0   # doubled after each failed attempt
# Fault injection: SIGKILL this process right after the save of that step starts
# writing (before orbax commits it), as a hard preemption would.
KILL_DURING_SAVE = "JAXREC_FAULT_KILL_DURING_SAVE"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not belong to the model being trained."""


class CheckpointReadError(RuntimeError):
  """A checkpoint that could not be read for a reason that does not prove it broken."""


class CheckpointCorruptError(RuntimeError):
  """Reading a checkpoint's own files failed in a way that proves them broken. Only
  this error moves a checkpoint aside: errors raised while *interpreting* a readable
  checkpoint (our code, a newer schema) say nothing about its files."""


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
  """A read error worth retrying: time-outs, dropped connections, I/O errors."""
  for err in _chain(e):
    if isinstance(err, (TimeoutError, ConnectionError, InterruptedError)):
      return True
    if (isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
        and err.errno in TRANSIENT_ERRNOS):
      return True
  return False


def is_corrupt(e: BaseException) -> bool:
  """An error that shows the checkpoint itself is broken: missing or unparsable
  files, metadata that does not describe the arrays, bytes that do not decode."""
  if is_transient(e):
    return False
  return any(isinstance(err, (FileNotFoundError, ValueError, KeyError, IndexError, TypeError,
                              json.JSONDecodeError)) for err in _chain(e))


def retrying(read, what: str):
  """read() with retries of transient errors (exponential backoff)."""
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except Exception as e:  # noqa: BLE001
      if not is_transient(e) or attempt == READ_ATTEMPTS - 1:
        raise
      wait = RETRY_BACKOFF_S * 2 ** attempt
      logging.warning("reading %s failed (%s: %s); retrying in %.1fs", what,
                      type(e).__name__, e, wait)
      time.sleep(wait)


def _read_files(read, what: str):
  """retrying(read), with errors that prove the files broken as CheckpointCorruptError."""
  try:
    return retrying(read, what)
  except Exception as e:  # noqa: BLE001  (classified here, re-raised otherwise)
    if is_corrupt(e):
      raise CheckpointCorruptError(f"{what}: {type(e).__name__}: {str(e)[:300]}") from e
    raise


def param_shapes(params: Any) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): list(x.shape) for path, x in flat}


class Checkpointer:
  def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_names=("state", "meta", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data: dict[str, Any] | None = None) -> None:
    """`data`: the input iterator's state, saved through grain's orbax handler (one
    file per process) and, since ours is the same on every process, in `meta` too."""
    meta = {"format_version": FORMAT_VERSION, "step": int(step), **meta}
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      meta["data_state"] = data
      items["data"] = grain.checkpoint.CheckpointSave(FrozenState(data))
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items),
                      force=True)
    if os.environ.get(KILL_DURING_SAVE) == str(step):  # fault injection for tests
      os.kill(os.getpid(), signal.SIGKILL)

  def read_meta(self, step: int) -> dict[str, Any]:
    return _read_files(lambda: self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"], f"checkpoint {step} metadata")

  def read_data_state(self, step: int) -> dict[str, Any] | None:
    """The input iterator's state saved at `step` by this process (grain's file), or
    the copy in the meta when this process count wrote no file; None for
    checkpoints from before the grain pipeline (their data position is the step)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(FrozenState({}))))
      return restored["data"].get_state()
    except (ValueError, FileNotFoundError, KeyError):
      return self.read_meta(step).get("data_state")

  def restore(self, step: int, target: Any) -> Any:
    """Restores onto the shapes and shardings carried by `target` (any mesh)."""
    return _read_files(lambda: self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"], f"checkpoint {step}")

  def quarantine(self, step: int) -> Path:
    """Moves a broken step aside (kept for inspection, never deleted) so the run can
    save that step again. Process 0 moves the shared folder; every process waits for
    it at a barrier before looking at the folder again."""
    dest = (self.directory.parent / f"{self.directory.name}-unreadable" /
            f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxrec quarantine checkpoint {step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_compatible(saved: dict[str, list[int]], current: dict[str, list[int]],
                     where: Path) -> None:
  for name in sorted(set(saved) | set(current)):
    a, b = saved.get(name), current.get(name)
    if a != b:
      raise CheckpointMismatchError(
          f"checkpoint {where} is from a different model: parameter {name} has shape "
          f"{a if a is not None else '(absent)'} in the checkpoint but "
          f"{b if b is not None else '(absent)'} in the current model; use a fresh "
          "--workdir or the model config the checkpoint was trained with")


def dump_json(path: Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)
