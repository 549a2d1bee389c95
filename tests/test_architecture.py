"""The package tree keeps its promises (docs/architecture.md): no import cycles at import time,
the library never imports the CLI, no private names imported across modules, the component-source
module depends on nothing heavier than the spec, and importing the public packages is silent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

# the source folders and the package each one installs as (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"composer": ROOT / "composer", "composer.adapters": ROOT / "adapters", "composer.export": ROOT / "export"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("composer.adapters") and pkg == "composer":
                continue
            out[name] = f
    return out


def _imports(tree: ast.Module, module: str, *, top_level_only: bool):
    """(imported module, [names]) of every ``import``/``from`` in ``tree``; with
    ``top_level_only``, those that run at import time (not inside functions or TYPE_CHECKING)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:
            continue  # `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            yield base, [a.name for a in node.names]


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        deps = set()
        for target, names in _imports(ast.parse(f.read_text()), name, top_level_only=top_level_only):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != name:
                    deps.add(cand)
                    break
        graph[name] = deps
    return graph


def test_no_import_cycles_at_import_time():
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_the_library_never_imports_the_cli_and_sources_stay_light():
    graph = _graph(top_level_only=False)
    cli = lambda m: m == "composer.cli" or m.startswith("composer.cli.")  # noqa: E731  (the package and its commands)
    assert [m for m, deps in graph.items() if not cli(m) and any(map(cli, deps))] == []
    # the builder reads component sources from a module that publishes nothing
    assert graph["composer.hub.sources"] <= {"composer.errors", "composer.spec", "composer.refs"}
    assert graph["composer.refs"] <= {"composer.spec"}
    assert "composer.hub.publish" not in graph["composer.builder"]
    # the model card is built from recorded facts, never by building a model
    assert not graph["composer.hub.card"] & {"composer.builder", "composer.model"}
    assert not any(map(cli, graph["composer.train.profile"]))


def test_no_private_names_imported_across_modules():
    mods = _modules()
    bad = []
    for name, f in mods.items():
        for target, names in _imports(ast.parse(f.read_text()), name, top_level_only=False):
            if target.startswith("composer"):
                bad += [f"{name}: {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []


def test_public_packages_import_silently():
    code = "import composer, composer.export, composer.train, composer.hub, composer.analysis"
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # and the lazy public names resolve
    code = (
        "import composer, composer.export, composer.train, composer.hub; "
        "composer.ComposedModel, composer.export.export_onnx, composer.export.OnnxPipeline, "
        "composer.train.train, composer.train.TrainConfig, composer.hub.push_to_hub, composer.hub.pull"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert r.returncode == 0, r.stderr
