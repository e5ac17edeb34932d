"""Fakes 8 CPU devices before jax initialises its backends, and caches compiles."""

import os
import sys

# The collective timeouts: XLA's CPU collectives abort when a device thread is 40 s
# late, which a loaded 2-core CI machine can hit (see experiments/runtime.py).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
                           " --xla_cpu_collective_timeout_seconds=1800"
                           # tests compile far more than they run: skip LLVM's costly
                           # passes (~30% off the suite; equivalence is unaffected)
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The slow suite's longest test by far (the README commands, 8-14 min) sits in a file of
# two tests, and xdist queues files by test count, so it used to start last and run
# alone. For the slow suite, files go out in collection order with it first.
_START_FIRST = "test_readme_commands.py"


def pytest_configure(config):
  if config.option.markexpr == "slow" and hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name != _START_FIRST)   # stable: others keep order
