"""The house's rules, checked on the source: no module uses another module's private names, the core
imports neither Ray nor the layers above it (the import-linter contracts in pyproject.toml, run here too), and
the tests mirror the source (the tests of `worldgen/nodes/llm.py` are `tests/worldgen/nodes/test_llm.py`).

A private name is `_name` (not a dunder). A module may use its own private names, and the protected members
of its classes' base classes (a subclass overriding a hook is what a hook is for); any other `from X import
_name`, `import X._y`, or `obj._name` is an offender, for X one of the project's packages or Ray. Ray's
private API is allowed in exactly one place, actors/cluster.py, where Ray has no public alternative (listed
in RAY_PRIVATE_ALLOWED with why). Other libraries' private names (on names imported from them) are not this
check's business.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worldgen", "actors", "serve_apps", "train_jobs")

# (file, name) -> why Ray's private API is used there: Ray offers no public way to do it.
RAY_PRIVATE_ALLOWED = {
    ("actors/cluster.py", "ray._private.services"): "resolve 'auto' like ray.init does (stale local records)",
    ("actors/cluster.py", "ray._private.state"): "read the autoscaler's node groups (may the cluster grow?)",
    ("actors/cluster.py", "_internal_kv_get"): "read the v1 autoscaler's status (may the cluster grow?)",
    ("actors/cluster.py", "_actor_id"): "an actor handle's id for the state API (no public getter)",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            trees[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(), str(path))
    return trees


def _classes(trees: dict[str, ast.Module]) -> dict[str, tuple[list[str], set[str]]]:
    """Class name -> (base names, private names it defines: methods, class attributes, `self._x = …`)."""
    classes: dict[str, tuple[list[str], set[str]]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            names = {n for sub in ast.walk(node) for n in _defined(sub) if _private(n)}
            classes.setdefault(node.name, ([], set()))
            classes[node.name][0].extend(bases)
            classes[node.name][1].update(names)
    return classes


def _defined(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return [node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
        return [node.attr]
    if isinstance(node, ast.arg):
        return [node.arg]
    return []


def _own_names(tree: ast.Module, classes: dict[str, tuple[list[str], set[str]]]) -> set[str]:
    """Private names this module may use: those it defines, and those its classes inherit."""
    own = {n for node in ast.walk(tree) for n in _defined(node) if _private(n)}
    todo = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        bases, names = classes[name]
        own |= names
        todo += bases
    return own


def _checked(module: str) -> bool:
    return module.split(".")[0] in (*PACKAGES, "ray")


def _foreign_names(tree: ast.Module) -> set[str]:
    """Names the module binds by importing them from other libraries (not the project's, not Ray)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and not _checked(node.module or ""):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if not _checked(a.name)}
    return names


def _offenders(file: str, tree: ast.Module, own: set[str]) -> list[tuple[str, str, int]]:
    found = []
    foreign = _foreign_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _checked(node.module or ""):
            module = node.module or ""
            if any(_private(part) for part in module.split(".")):
                found.append((file, module, node.lineno))
            found += [(file, a.name, node.lineno) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [
                (file, a.name, node.lineno)
                for a in node.names
                if _checked(a.name) and any(_private(p) for p in a.name.split("."))
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in foreign):
                continue
            found.append((file, node.attr, node.lineno))
    return found


def private_name_offenders() -> list[tuple[str, str, int]]:
    trees = _modules()
    classes = _classes(trees)
    found = []
    for file, tree in trees.items():
        found += _offenders(file, tree, _own_names(tree, classes))
    return sorted(found)


def test_no_module_uses_another_modules_private_names():
    offenders = [
        (file, name, line)
        for file, name, line in private_name_offenders()
        if (file, name) not in RAY_PRIVATE_ALLOWED
    ]
    listing = "\n".join(f"  {file}:{line}: {name}" for file, name, line in offenders)
    assert not offenders, f"private names used outside their module ({len(offenders)}):\n{listing}"


def test_the_check_finds_a_private_import_and_a_private_attribute(tmp_path):
    tree = ast.parse(
        "from worldgen.engine import _edge_key\nimport ray._private.services\n"
        "def f(graph):\n    graph._items['n'] = 1\n    return self._plan\n"
    )
    found = {(name, line) for _, name, line in _offenders("x.py", tree, own=set())}
    assert found == {("_edge_key", 1), ("ray._private.services", 2), ("_items", 4)}


def test_the_allowed_ray_privates_are_still_used():
    """An allowance that no longer matches anything is stale: remove it."""
    used = {(file, name) for file, name, _ in private_name_offenders()}
    assert set(RAY_PRIVATE_ALLOWED) <= used, sorted(set(RAY_PRIVATE_ALLOWED) - used)


def test_import_contracts_are_kept():
    """`lint-imports` (import-linter, configured in pyproject.toml): the layers, no Ray in the core, no
    cycles inside the core."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# Test modules that test a whole layer rather than one of its modules (path under tests/ -> why).
LAYER_WIDE_TESTS = {
    "serve_apps/test_fuzz.py": "fuzzes every Serve application of the layer through its OpenAPI document",
}


def _tested_module(test: Path) -> Path | None:
    """The source module a mirrored test module tests: tests/<path>/test_<name>.py tests <path>/<name>.py (or the
    package <path>/<name>/), or <path>/<module>.py for a name `<module>_<aspect>` (test_cli_models.py: cli.py)."""
    folder = ROOT / test.parent.relative_to(ROOT / "tests")
    name = test.stem.removeprefix("test_")
    parts = name.split("_")
    for cut in range(len(parts), 0, -1):
        stem = "_".join(parts[:cut])
        for candidate in (folder / f"{stem}.py", folder / stem / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def test_the_tests_mirror_the_source():
    """Every test module under tests/<package>/ is named after the source module it tests, in the same folder,
    so a newcomer finds a file's tests by its name (tests/ itself holds the whole-project checks)."""
    tests_root = ROOT / "tests"
    strays = []
    for test in sorted(tests_root.rglob("test_*.py")):
        relative = test.relative_to(tests_root).as_posix()
        if test.parent == tests_root or relative in LAYER_WIDE_TESTS:
            continue
        if relative.split("/")[0] not in PACKAGES or _tested_module(test) is None:
            strays.append(relative)
    assert not strays, (
        "test modules that mirror no source module (name them after the module they test): "
        + (", ".join(strays))
    )
    for relative in LAYER_WIDE_TESTS:  # an exception for a file that is gone is stale: remove it
        assert (tests_root / relative).is_file(), relative


def test_the_mirror_check_finds_a_stray():
    assert (
        _tested_module(ROOT / "tests" / "worldgen" / "nodes" / "test_llm.py")
        == ROOT / "worldgen/nodes/llm.py"
    )
    assert _tested_module(ROOT / "tests" / "worldgen" / "test_cli_models.py") == ROOT / "worldgen/cli.py"
    assert (
        _tested_module(ROOT / "tests" / "worldgen" / "models" / "test_pool.py")
        == ROOT / "worldgen/models/pool.py"
    )
    assert _tested_module(ROOT / "tests" / "worldgen" / "test_no_such_module.py") is None
    assert _tested_module(ROOT / "tests" / "actors" / "test_graph.py") is None  # graph.py is in worldgen/
