"""Flags shared by every experiment entry point: devices, multi-process, logs.

`--cpu_devices=N` and the multi-process start must act before jax creates its
backends, so entry points call `setup()` first thing in main() and import the
rest of jaxrec afterwards. Only process 0 logs at INFO.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys

from absl import flags, logging

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Fake this many CPU devices (runs on the CPU); 0 = use the real devices.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process run "
    "(or JAX_COORDINATOR_ADDRESS); empty: auto-detect a TPU pod / SLURM job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0,
                                      "Processes in the run (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (or JAX_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: start the multi-process runtime when an address is given or a cluster is "
    "detected; on: always (JAX detects the cluster); off: single process.")
_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False, "Show INFO logs of jax/orbax internals (hidden by default).")


class _QuietLibraries(py_logging.Filter):
  """Hides INFO chatter of orbax and jax internals; warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return not any(part in path for part in ("/orbax/", "/jax/", "/jaxlib/"))


# XLA's CPU collectives abort a run when one device thread is 40 s late to a
# rendezvous; with many faked devices on a small, busy machine that happens. Wait
# (and warn) far longer instead.
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                        "--xla_cpu_collective_timeout_seconds=1800")


def setup() -> None:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_FLAGS}".strip()
  import jax
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  if _CPU_DEVICES.value > 0:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  from jaxrec import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _DISTRIBUTED.value, cpu=_CPU_DEVICES.value > 0)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def user_errors():
  """Bad input (config, mesh, data, checkpoint) ends the run with its message, not a trace."""
  from jaxrec.config import ConfigError
  from jaxrec.data.loaders import DataFormatError
  from jaxrec.mesh import MeshSpecError
  from jaxrec.partitioning import PartitioningError
  from jaxrec.parallel.pipeline import PipelineConfigError
  from jaxrec.train.checkpoint import CheckpointMismatchError, CheckpointReadError
  from jaxrec.train.loop import NonFiniteTrainingError
  try:
    yield
  except (ConfigError, DataFormatError, MeshSpecError, PartitioningError, PipelineConfigError,
          CheckpointMismatchError, CheckpointReadError, FileNotFoundError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteTrainingError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
