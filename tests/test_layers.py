"""The import layering of docs/architecture.md, enforced over every import — those inside functions
included. A module imports only from its own layer or lower ones; inside a layer there are no
cycles. The one sanctioned exception: ``ComposedModel``'s ``save_pretrained``/``from_pretrained``/
``push_to_hub`` (the transformers-style methods users call on a model) import the checkpoint and
Hub modules above it, lazily. A planted upward import makes the check fail (tested below)."""

from __future__ import annotations

import ast

from test_architecture import PACKAGES, _modules

# Low to high. A module's layer is its longest matching prefix here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",  # errors, the spec, sources and references, text in and out: no torch modules of ours
        (
            "composer.errors", "composer.lazy", "composer.spec", "composer.shipped", "composer.options",
            "composer.packages", "composer.targets", "composer.refs", "composer.hub.sources", "composer.hf_weights",
            "composer.ct2", "composer.tokenizer", "composer.prompting", "composer.layout", "composer.generation",
            "composer.records",
        ),
    ),
    (
        "components",  # encoders, LLM adapters, projectors, the runtime front end, model arithmetic
        (
            "composer.adapters", "composer.projectors", "composer.gguf", "composer.frontend",
            "composer.analysis.flops", "composer.analysis.summary",
        ),
    ),
    ("model", ("composer.model",)),
    ("build", ("composer.builder",)),
    ("checkpoint", ("composer.checkpoint",)),
    ("export, train, hub", ("composer.export", "composer.train", "composer.hub")),
    (
        "applications",
        ("composer.analysis", "composer.serve", "composer.batch", "composer.text_pipeline", "composer"),
    ),
    ("cli", ("composer.cli",)),
]  # fmt: skip

# (importer, function, imported): the lazy upward imports the design allows
ALLOWED_UPWARD = {
    ("composer.model", "ComposedModel.save_pretrained", "composer.checkpoint"),
    ("composer.model", "ComposedModel.from_pretrained", "composer.checkpoint"),
    ("composer.model", "ComposedModel.from_pretrained", "composer.hub.publish"),
    ("composer.model", "ComposedModel.push_to_hub", "composer.hub.publish"),
}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
    return rank


class _Imports(ast.NodeVisitor):
    """Every import of a module with the qualified name of the function it sits in ("" at top level)."""

    def __init__(self, module: str):
        self.module, self.scope, self.found = module, [], []

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node):
        for a in node.names:
            self.found.append((".".join(self.scope), a.name, [], node.lineno))

    def visit_ImportFrom(self, node):
        if node.module is None and not node.level:
            return
        base = node.module or ""
        if node.level:
            parent = self.module.split(".")[: -node.level]
            base = ".".join(parent + ([node.module] if node.module else []))
        self.found.append((".".join(self.scope), base, [a.name for a in node.names], node.lineno))


def edges(sources: dict[str, str]):
    """(importer, function, imported module, line) for every import between the package's modules."""
    for name, text in sources.items():
        v = _Imports(name)
        v.visit(ast.parse(text))
        for func, target, names, line in v.found:
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in sources and cand != name:
                    yield name, func, cand, line
                    break


def violations(sources: dict[str, str]) -> list[str]:
    """Upward imports (outside ALLOWED_UPWARD) and import cycles inside a layer, as messages."""
    out = []
    graph: dict[str, set[str]] = {n: set() for n in sources}
    for a, func, b, line in edges(sources):
        la, lb = layer_of(a), layer_of(b)
        if lb > la and (a, func, b) not in ALLOWED_UPWARD:
            where = f"{a}:{line}" + (f" ({func})" if func else "")
            out.append(f"{where} imports {b}: layer '{LAYERS[lb][0]}' is above '{LAYERS[la][0]}'")
        if lb == la:
            graph[a].add(b)
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                out.append("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return out


def _sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in _modules().items()}


def test_every_import_respects_the_layers():
    assert PACKAGES  # the same module map as test_architecture
    assert violations(_sources()) == []
    used = {(a, func, b) for a, func, b, _ in edges(_sources())}
    assert ALLOWED_UPWARD <= used, f"stale exceptions: {sorted(ALLOWED_UPWARD - used)}"


def test_a_planted_upward_import_fails():
    """A lazy import of the model from the spec module, and of the CLI from the exporter, are
    each reported with the importing function and line; a cycle inside a layer is reported too."""
    src = _sources()
    src["composer.spec"] += "\n\ndef _planted():\n    from composer.model import ComposedModel\n"
    src["composer.export.exporter"] += "\n\ndef _planted():\n    import composer.cli\n"
    found = violations(src)
    assert any(v.startswith("composer.spec:") and "(_planted) imports composer.model" in v for v in found), found
    assert any("composer.export.exporter:" in v and "imports composer.cli" in v for v in found), found
    src = _sources()
    src["composer.errors"] += "\n\ndef _planted():\n    from composer.spec import Spec\n"
    assert any(v.startswith("import cycle:") and "composer.errors" in v for v in violations(src))


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)
