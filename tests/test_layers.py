"""The package's floors: no module of persvid_jax imports from a floor above its own.

Read with ``ast`` (nothing is imported), so a lazy import inside a function
counts as much as one at the top of the file. ``launch/`` sits above every
floor: the package never imports it, and only it knows where ``configs/`` lies.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "persvid_jax"

# Bottom to top. A unit (a top-level module or subpackage of persvid_jax) may
# import from its own floor and the floors below it, never from one above.
FLOORS = (
    # Base: configs, mesh rules, checkpoints, param dicts, XLA options, atomic writes; no model.
    ("config_lib", "sharding", "checkpoint", "params", "xla_options", "atomic"),
    # The networks, and the diffusion math (pure functions of a denoise_fn).
    ("models", "diffusion"),
    # Built on the networks: the concept bank and database, the data sources,
    # run records (they say which attention the models pick on this machine:
    # models.attention).
    ("concepts", "data", "records"),
    # Inference: load and export a model, generate the six modes, write media.
    ("pipeline",),
    # Training: its previews go through pipeline.media, init_from reads an
    # exported model through pipeline.model. Weight conversion: it writes a
    # model directory and reads it back through pipeline.model.
    ("train", "convert"),
    # Evaluation: generates through pipeline, scores with the ground truth of data.
    ("evaluate",),
    # Over everything: the applications (the demo job, the UI), the benchmark, sweeps.
    ("apps", "bench", "sweep"),
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


def _modules() -> list[tuple[str, pathlib.Path]]:
  """``(dotted name, file)`` of every module under persvid_jax/."""
  out = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out.append((".".join(parts), path))
  return out


def _imported(module: str, tree: ast.AST, is_package: bool) -> list[str]:
  """Every dotted name ``tree`` imports (``from a import b`` gives ``a.b``)."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: from the module's package, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
      names += [f"{base}.{a.name}" for a in node.names]
  return names


def _unit(dotted: str) -> str | None:
  """The floor unit of a ``persvid_jax.X...`` name; None outside the package."""
  parts = dotted.split(".")
  if parts[0] != "persvid_jax" or len(parts) < 2:
    return None
  return parts[1]


def upward_imports(module: str, source: str, is_package: bool = False) -> list[str]:
  """What ``source`` (the text of ``module``) imports from a floor above its own."""
  own = FLOOR[_unit(module)]
  problems = []
  for name in _imported(module, ast.parse(source), is_package):
    unit = _unit(name)
    if unit in FLOOR and FLOOR[unit] > own:
      problems.append(f"{module} imports {name} ({unit}: floor {FLOOR[unit]} > {own})")
  return problems


def _configs_paths(tree: ast.AST) -> list[str]:
  """String constants that build a path to a ``configs`` folder.

  ``configs/NAME.py`` in a message or docstring is text for the user; a path
  is the word alone (``root / "configs"``) or a ``configs/...`` string handed
  to ``/``, ``Path(...)`` or ``os.path.join(...)``.
  """
  found = []
  for node in ast.walk(tree):
    operands = []
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
      operands = [node.left, node.right]
    elif isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      if name in ("Path", "PurePath", "join", "joinpath"):
        operands = list(node.args)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.strip("/") == "configs":
        found.append(node.value)
    for op in operands:
      if isinstance(op, ast.Constant) and isinstance(op.value, str) and \
         op.value.startswith("configs"):
        found.append(op.value)
  return found


def _launchers_run(tree: ast.AST) -> list[str]:
  """String constants that are a launcher's module name (``'launch.train'``, for ``-m``)."""
  return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
          and isinstance(n.value, str) and re.fullmatch(r"launch(\.\w+)+", n.value)]


MODULES = _modules()


def test_every_unit_has_a_floor():
  """A new module or subpackage must be given its floor in FLOORS."""
  units = {_unit(name) for name, _ in MODULES} - {None}
  assert units <= set(FLOOR), f"give these a floor in FLOORS: {sorted(units - set(FLOOR))}"


@pytest.mark.parametrize("module,path", [m for m in MODULES if _unit(m[0])],
                         ids=[m[0] for m in MODULES if _unit(m[0])])
def test_no_import_from_a_floor_above(module, path):
  assert upward_imports(module, path.read_text(), path.name == "__init__.py") == []


def test_the_check_sees_an_upward_import():
  """pipeline importing evaluate (the demo's old place) is refused, in any spelling."""
  for source in ("from persvid_jax.evaluate import fidelity",
                 "import persvid_jax.evaluate.fidelity",
                 "def f():\n  from persvid_jax import evaluate",
                 "from ..evaluate import fidelity"):
    assert upward_imports("persvid_jax.pipeline.demo", source), source
  assert upward_imports("persvid_jax.apps.demo", "from persvid_jax.evaluate import fidelity") == []
  assert upward_imports("persvid_jax.train.loop", "from persvid_jax.train import step") == []


def test_the_package_never_imports_launch_nor_knows_configs():
  """launch/ drives the package, never the reverse (no import, no ``-m launch.X`` of
  its own: a sweep is handed its launcher); only launch/ knows where configs/ is."""
  for module, path in MODULES:
    tree = ast.parse(path.read_text())
    launch = [n for n in _imported(module, tree, path.name == "__init__.py")
              if n.split(".")[0] == "launch"]
    assert launch == [], f"{module} imports {launch}"
    assert _launchers_run(tree) == [], f"{module} starts a launcher: {_launchers_run(tree)}"
    assert _configs_paths(tree) == [], f"{module} builds a path to configs/: {_configs_paths(tree)}"
  assert _configs_paths(ast.parse('ROOT / "configs"'))
  assert _configs_paths(ast.parse('pathlib.Path("configs/tiny.py")'))
  assert not _configs_paths(ast.parse('raise ValueError("give configs/NAME.py")'))
  assert _launchers_run(ast.parse('cmd = [python, "-m", "launch.train"]'))
  assert not _launchers_run(ast.parse('HINT = "python -m launch.train --config ..."'))
