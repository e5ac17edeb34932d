"""Pipeline parallelism over the `pipe` axis in one SPMD program: GPipe, 1F1B and
interleaved schedules from one table-driven, scanned executor.

  layout.py     which layer lives in which slot of which device (StageLayout)
  schedules.py  schedules as (tick x device) tables, bubbles, send patterns
  executor.py   one `lax.scan` over the table's ticks inside shard_map
"""

from jaxrec.parallel.pipeline.executor import PipelineResult, StagePieces, run
from jaxrec.parallel.pipeline.layout import (PipelineConfigError, StageLayout, microbatch,
                                             parse_layers_per_stage)
from jaxrec.parallel.pipeline.schedules import OP_NAMES, SCHEDULES, Op, Schedule, validate_schedule

__all__ = ["OP_NAMES", "Op", "PipelineConfigError", "PipelineResult", "SCHEDULES", "Schedule",
           "StageLayout", "StagePieces", "microbatch", "parse_layers_per_stage", "run",
           "validate_schedule"]
