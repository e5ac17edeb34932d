"""The flags the serving entry points share (recommend, serve): which trained run, on
which inference mesh, with which item-table layout."""

from __future__ import annotations

from typing import Any

from absl import flags

from experiments import runtime

WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "A training run's folder.")
MESH = flags.DEFINE_string("mesh", "data:-1", "Inference mesh (no pipe axis).")
TABLE = flags.DEFINE_enum("table", "replicated", ["replicated", "tensor", "rows"],
                          "Item table layout on the inference mesh.")


def load() -> tuple[Any, Any]:
  """(Servable, its Dataset) of --workdir on --mesh with --table; a bad value or a
  missing run exits with one line naming it."""
  from jaxrec.serve.servable import Servable
  with runtime.user_errors():
    servable = Servable.load(WORKDIR.value, MESH.value, TABLE.value)
    return servable, servable.dataset()
