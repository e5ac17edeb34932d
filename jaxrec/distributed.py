"""Multi-process start-up: JAX's multi-controller runtime from flags or the environment.

Every process runs the same program; `jax.distributed.initialize` connects them
before any device is used. Sources, in order: explicit arguments (flags), then
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then JAX's own
cluster detection (TPU VM pod slices, SLURM). On the CPU, processes talk through
the gloo collectives.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")


class DistributedConfigError(ValueError):
  pass


def _cluster_detected() -> bool:
  """True under a multi-task SLURM job or on a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               mode: str = "auto", cpu: bool = False) -> bool:
  """Connects this process to the others. Returns whether it is a multi-process run.

  mode 'auto' initializes when an address is given or a cluster is detected,
  'on' always (JAX detects the cluster), 'off' never.
  """
  if mode not in MODES:
    raise DistributedConfigError(f"--distributed={mode!r}; valid values: {', '.join(MODES)}")
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
  index = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
  explicit = bool(address)
  if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
    return False
  if explicit and (count < 1 or not 0 <= index < count):
    raise DistributedConfigError(
        f"with a coordinator address ({address}) give the process count and this "
        f"process's id: got num_processes={count}, process_id={index} (need "
        "0 <= process_id < num_processes)")
  if cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(address, num_processes=count, process_id=index)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d connected (%d local devices, %d in all)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1
