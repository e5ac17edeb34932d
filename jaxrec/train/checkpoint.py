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

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
# Fault injection: SIGKILL this process right after the save of that step starts
# writing (before orbax commits it), as a hard preemption would.
KILL_DURING_SAVE = "JAXREC_FAULT_KILL_DURING_SAVE"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not belong to the model being trained."""


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
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    meta = {"format_version": FORMAT_VERSION, "step": int(step), **meta}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if os.environ.get(KILL_DURING_SAVE) == str(step):  # fault injection for tests
      os.kill(os.getpid(), signal.SIGKILL)

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any) -> Any:
    """Restores onto the shapes and shardings carried by `target` (any mesh)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]

  def quarantine(self, step: int) -> Path:
    """Moves an unreadable step aside (kept for inspection, never deleted) so the run
    can save that step again."""
    dest = self.directory.parent / f"{self.directory.name}-unreadable" / f"{step}-{int(time.time())}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(dest)
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
