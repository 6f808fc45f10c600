"""Imports only point down (BUILD.md, "Layout"): every import in mmcl/ and data_pipelines/,
module-level or inside a function, read with `ast` (nothing is imported)."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Bottom to top; a package may import its own modules and any package below it. `tasks` is the
# registry (mmcl/tasks/__init__.py); each method package (mmcl/tasks/<method>/) sits above it
# beside the others and may import none of them, nor the registry.
LAYERS = ("config", "parallel", "losses", "models", "train", "workdir", "eval", "export", "serve",
          "pretrained", "tasks", "methods", "sweep", "launch", "cli")
METHODS = sorted(p.name for p in (REPO / "mmcl" / "tasks").iterdir()
                 if (p / "__init__.py").is_file())


def _unit(module: str) -> str | None:
  """The layer unit of a dotted module name: 'data_pipelines', an mmcl package, 'tasks' (the
  registry), 'tasks.<method>', or None (outside the project)."""
  parts = module.split(".")
  if parts[0] == "data_pipelines":
    return "data_pipelines"
  if parts[0] != "mmcl" or len(parts) == 1:
    return None
  if parts[1] == "tasks" and len(parts) > 2 and parts[2] in METHODS:
    return f"tasks.{parts[2]}"
  return parts[1]


def _rank(unit: str) -> int:
  return LAYERS.index("methods" if unit.startswith("tasks.") else unit)


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return out


def violations(module: str, source: str, where: str) -> list[str]:
  """The upward (or sideways) imports of one module, one line each."""
  src = _unit(module)
  bad = []
  for line, target in _imported(ast.parse(source)):
    dst = _unit(target)
    if dst is None or dst == src:
      continue
    if src == "data_pipelines":
      bad.append(f"{where}:{line}: data_pipelines imports {target} (it never imports mmcl)")
    elif dst == "data_pipelines":
      continue
    elif src.startswith("tasks.") and dst.startswith("tasks."):
      bad.append(f"{where}:{line}: method {src} imports method {dst} (share code below them)")
    elif src.startswith("tasks.") and dst == "tasks":
      bad.append(f"{where}:{line}: method {src} imports the task registry {target}")
    elif not {src, dst} <= set(LAYERS) | {f"tasks.{m}" for m in METHODS}:
      bad.append(f"{where}:{line}: {src} imports {target}: a package outside the layers")
    elif _rank(dst) >= _rank(src):
      bad.append(f"{where}:{line}: {src} imports {target}, a layer at or above it")
  return bad


def _modules():
  for root in ("mmcl", "data_pipelines"):
    for path in sorted((REPO / root).rglob("*.py")):
      rel = path.relative_to(REPO)
      parts = list(rel.with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      if parts == ["mmcl"]:
        continue  # the top-level package only names its subpackages (lazily)
      yield ".".join(parts), path.read_text(), str(rel)


def test_every_package_has_a_layer():
  units = {_unit(m) for m, _, _ in _modules()} - {"data_pipelines"}
  assert {u for u in units if not u.startswith("tasks.")} <= set(LAYERS)
  assert {"clip", "sasrec", "demure", "mmsrec", "gcl", "loev", "artist_retrieval"} <= set(METHODS)


def test_imports_only_point_down():
  bad = [v for m, source, where in _modules() for v in violations(m, source, where)]
  assert bad == []


def test_the_check_sees_upward_and_sideways_imports():
  planted = ("from mmcl.tasks import get_task_class\n"
             "def f():\n  from mmcl.tasks.clip import task\n  import mmcl.pretrained.text\n")
  assert len(violations("mmcl.eval.planted", planted, "eval")) == 3
  assert len(violations("mmcl.tasks.gcl.planted", planted, "gcl")) == 2  # registry, clip
  assert len(violations("data_pipelines.planted", "from mmcl.config import Config\n", "dp")) == 1
  assert violations("mmcl.cli", planted, "cli") == []
