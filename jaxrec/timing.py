"""Wall-clock timing of compiled functions (one median timer for the whole project)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


def median_seconds(fn: Callable, make_args: Callable[[], tuple], repeats: int) -> float:
  """Median wall time of `fn(*make_args())` after one warm-up (compile) call. Fresh
  arguments each call (made outside the timed region): `fn` may donate them."""
  jax.block_until_ready(fn(*make_args()))
  times = []
  for _ in range(repeats):
    args = jax.block_until_ready(make_args())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
