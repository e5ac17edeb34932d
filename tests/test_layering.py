"""Imports only go down the layers of docs/design.md, and none hides inside a function."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. A module may import its own layer or a lower one.
LAYERS = [
    {"jaxrec.config", "jaxrec.mesh", "jaxrec.partitioning", "jaxrec.hardware",
     "jaxrec.timing", "jaxrec.distributed"},
    {"jaxrec.data"},
    {"jaxrec.parallel"},
    {"jaxrec.models"},
    {"jaxrec.layout"},
    {"jaxrec.eval"},
    {"jaxrec.train"},
    {"jaxrec.serve"},
    {"jaxrec.perf"},
]


def layer_of(module: str) -> int:
  if module == "jaxrec":   # the package root imports nothing
    return 0
  for rank, names in enumerate(LAYERS):
    if any(module == n or module.startswith(n + ".") for n in names):
      return rank
  raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it")


def modules() -> list[tuple[str, Path]]:
  out = []
  for path in sorted((ROOT / "jaxrec").rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out.append((name, path))
  return out


def jaxrec_imports(tree: ast.AST):
  """(imported module, line, inside a function?) for every import of jaxrec."""
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, in_function) for a in child.names
                     if a.name.startswith("jaxrec"))
      elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("jaxrec"):
        for alias in child.names:   # `from jaxrec import hardware` imports jaxrec.hardware
          target = f"{child.module}.{alias.name}"
          found.append((target if _is_module(target) else child.module, child.lineno,
                        in_function))
      visit(child, nested)

  visit(tree, False)
  return found


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:   # a name inside a module, not a submodule
    return False


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_imports_only_go_down_and_none_hides_in_a_function(name, path):
  importlib.import_module(name)   # each module imports on its own
  me = layer_of(name)
  for target, line, in_function in jaxrec_imports(ast.parse(path.read_text())):
    assert not in_function, (
        f"{path.name}:{line} imports {target} inside a function; imports of jaxrec go at "
        "the top of the module (a local import dodging a cycle hides a layering fault)")
    assert layer_of(target) <= me, (
        f"{path.name}:{line}: {name} (layer {me}) imports {target} (layer "
        f"{layer_of(target)}), a layer above it")


def test_the_rule_catches_an_upward_import():
  tree = ast.parse("from jaxrec.train.step import TrainProgram\n"
                   "def f():\n  from jaxrec.perf import hlo\n")
  found = jaxrec_imports(tree)
  assert [(t, inside) for t, _, inside in found] == [
      ("jaxrec.train.step", False), ("jaxrec.perf.hlo", True)]
  assert layer_of("jaxrec.train.step") > layer_of("jaxrec.parallel.balance")
