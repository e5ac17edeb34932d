import subprocess
import sys
from pathlib import Path

import pytest

from jaxrec.config import ConfigError, saved_config, validate
from jaxrec.mesh import MeshShape, MeshSpecError, make_mesh, parse_mesh_spec
from tests.helpers import tiny_config


def test_parse_fills_missing_axes_with_one():
  assert parse_mesh_spec("data:2,pipe:1,tensor:4", 8) == MeshShape(1, 2, 1, 4)
  assert parse_mesh_spec("tensor:2", 2).sizes == (1, 1, 1, 2)


def test_parse_infers_one_axis():
  assert parse_mesh_spec("data:-1,tensor:2", 8) == MeshShape(1, 4, 1, 2)


@pytest.mark.parametrize("spec, needle", [
    ("data:3", "3 devices"),
    ("data:2,expert:4", "unknown mesh axis 'expert'"),
    ("data:0,tensor:8", "size 0"),
    ("data:-2,tensor:4", "size -2"),
    ("data:two", "size 'two'"),
    ("data:-1,tensor:-1", "only one axis may be -1"),
    ("data:-1,tensor:3", "does not divide"),
    ("data:2,data:4", "appears twice"),
    ("data", "not 'axis:size'"),
    ("", "empty mesh spec"),
])
def test_bad_specs_name_the_value(spec, needle):
  with pytest.raises(MeshSpecError, match=needle):
    parse_mesh_spec(spec, 8)


def test_mesh_has_all_four_axes_in_order():
  mesh = make_mesh("tensor:2,data:4")
  assert mesh.axis_names == ("replica", "data", "pipe", "tensor")
  assert dict(mesh.shape) == {"replica": 1, "data": 4, "pipe": 1, "tensor": 2}


@pytest.mark.parametrize("overrides, mesh, needle", [
    ({"train.batch_size": 12}, MeshShape(data=8), "batch_size = 12 is not divisible"),
    ({"eval.batch_size": 100}, MeshShape(data=8), "eval.batch_size = 100"),
    ({"model.n_heads": 3, "model.d_model": 24}, MeshShape(tensor=2), "n_heads = 3"),
    ({"model.d_ff": 30}, MeshShape(tensor=4), "d_ff = 30"),
    ({"model.d_model": 30}, MeshShape(), "d_model = 30 is not divisible"),
    ({"model.positions": "alibi"}, MeshShape(), "'alibi'; valid values"),
    ({"pipeline.microbatches": 3}, MeshShape(data=8), "microbatches = 3 does not divide"),
    ({"train.steps": 0}, MeshShape(), "train.steps = 0 must be positive"),
    ({"model.position_init_std": -0.1}, MeshShape(), "position_init_std = -0.1 must be >= 0"),
    ({"train.adam_eps": 0.0}, MeshShape(), "adam_eps = 0.0 must be positive"),
    ({"model.block": "hstu", "model.sasrec_layout": "original"}, MeshShape(),
     "sasrec_layout = 'original' applies to model.block = 'sasrec' only"),
    ({"model.dropout_placement": "inside"}, MeshShape(),
     "dropout_placement = 'inside'; valid values are residual, reference"),
    ({"model.block": "hstu", "model.dropout_placement": "reference"}, MeshShape(),
     "dropout_placement = 'reference' applies to model.block = 'sasrec' only"),
    ({"dp.local_sgd_step": "sum"}, MeshShape(data=8),
     "local_sgd_step = 'sum'; valid values are sqrt_replicas, mean"),
    ({"dp.outer_lr": 0.0}, MeshShape(data=8), "outer_lr = 0.0 must be > 0"),
    ({"dp.local_sgd_warmup": -1}, MeshShape(data=8), "local_sgd_warmup = -1 must be >= 0"),
    ({"dp.local_sgd_warmup": 100}, MeshShape(data=8),
     "local_sgd_warmup = 100 ramps .*local_sgd_step = 'mean' has none to ramp"),
    ({"dp.outer_momentum": 1.0}, MeshShape(data=8), r"outer_momentum = 1.0 must be in \[0, 1\)"),
    ({"eval.exclude": "window"}, MeshShape(),
     "exclude = 'window'; valid values are history, input, none"),
])
def test_config_validation_errors(overrides, mesh, needle):
  with pytest.raises(ConfigError, match=needle):
    validate(tiny_config(**overrides), mesh)


@pytest.mark.parametrize("saved_eval,want", [
    ({"exclude_history": True}, "history"),                            # before scopes
    ({"exclude_history": True, "exclude_scope": "input"}, "input"),
    ({"exclude_history": False, "exclude_scope": "input"}, "none"),
    ({"exclude_history": False}, "none"),
    ({"exclude": "input"}, "input"),                                   # today's field
])
def test_a_checkpoint_from_before_eval_exclude_keeps_its_protocol(saved_eval, want):
  """`eval.exclude` replaced a bool (`exclude_history`) and a scope (`exclude_scope`):
  an older checkpoint's config reads as the protocol it was evaluated under."""
  c = saved_config({"eval": saved_eval})
  assert c.eval.exclude == want
  assert "exclude_history" not in c.eval and "exclude_scope" not in c.eval
  validate(c, MeshShape())


def test_unknown_config_key_is_an_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config.train.stpes=5",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "stpes" in result.stderr


CONFIG_FILES = sorted(Path(__file__).parent.parent.glob("experiments/configs/[!_]*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_experiment_configs_are_valid(path):
  """Configs build on each other (ml1m_hstu on ml1m_sampled's loss): a field one sets
  for its own block must not leak into a config where it is an error."""
  from experiments.runtime import load_config
  validate(load_config(str(path)), MeshShape())

