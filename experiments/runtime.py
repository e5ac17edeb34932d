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


# JAXREC_SMALL=1: every experiment shrinks its model, data and steps to a smoke run
# (the README's commands are run that way by tests/test_readme_commands.py).
SMALL_ENV = "JAXREC_SMALL"


def small() -> bool:
  return os.environ.get(SMALL_ENV, "") not in ("", "0")


def setup(cpu_devices: int = 0) -> None:
  """Flags that must act before jax creates its backends. `cpu_devices`: what this
  experiment's default mesh needs when it runs on the CPU (faked unless
  --cpu_devices says otherwise; an accelerator's own devices are used as they are)."""
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_FLAGS}".strip()
  import jax
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  if _CPU_DEVICES.value > 0:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  elif cpu_devices > 0:   # only the CPU backend gets them; a GPU/TPU stays the default
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  from jaxrec import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _DISTRIBUTED.value, cpu=_CPU_DEVICES.value > 0)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def load_config(path: str):
  """The `get_config()` of a config file (what --config= takes)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink(config):
  """A smoke-run copy of a config (JAXREC_SMALL): tiny model, a few steps, few users.
  The head count and the layer count (up to 8) are kept so the meshes and pipeline
  splits the command asks for still divide them."""
  from jaxrec.config import with_overrides
  heads = config.model.n_heads
  d_model = 8 * heads
  # a prepared dataset (a folder) was written for its own max_len
  max_len = (config.data.max_len if os.path.isdir(config.data.path or "")
             else min(config.data.max_len, 16))
  return with_overrides(config, {
      "model.d_model": d_model, "model.d_ff": 2 * d_model,
      "model.hstu_qk_dim": 0, "model.hstu_v_dim": 0,
      "model.n_layers": max(min(config.model.n_layers, 8), config.pipeline.virtual_stages * 2),
      "data.max_len": max_len, "train.steps": 4,
      "train.batch_size": 16, "train.log_every": 2,
      "train.eval_every": 4 if config.train.select_on else 0,
      "train.checkpoint_every": 0, "train.warmup_steps": 1, "eval.max_users": 16,
      "eval.batch_size": 16, "pipeline.microbatches": min(config.pipeline.microbatches, 2),
      "loss.token_chunk": 64})


def run_config(config):
  """The config an experiment runs: `config`, or its smoke-run copy under JAXREC_SMALL."""
  return shrink(config) if small() else config


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
