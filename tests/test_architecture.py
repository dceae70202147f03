"""The package's dependency rules (ARCHITECTURE.md), read from the source: no import cycles, imports at module top
(only optional dependencies are imported where they are used), and the config a leaf that every module may use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdpo"
# Imported inside the function that needs them: installed only for some runs (pyproject's extras) or torch versions.
OPTIONAL = {
    "transformer_engine.pytorch",
    "megatron.core.extensions.transformer_engine",  # imports only where Transformer Engine is installed
    "torch.utils.tensorboard",
    "wandb",
    "torch.nn.attention.varlen",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative import
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
    # `from mdpo import x` may name a submodule
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Module-level mdpo imports of every mdpo module, and (module, what it imports) for every import inside a
    function or class body."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    nested: list[tuple[str, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "module", None) == "__future__":
                continue
            targets = _imported(node, name, path.name == "__init__.py")
            if id(node) not in top:
                nested.append((name, targets[-1] if isinstance(node, ast.ImportFrom) else targets[0]))
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph, nested


def test_no_import_cycles():
    graph, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_are_at_module_top_except_optional_dependencies():
    _, nested = _graph()
    deferred = sorted({(module, imported) for module, imported in nested if imported not in OPTIONAL})
    assert not deferred, deferred


def test_models_and_data_do_not_import_each_other_nor_the_loop():
    """The intended direction (../shared/notes/style.md): data knows tokens, not models or the loop; models know
    neither files nor the loop. Shared descriptions (mdpo.blocks) sit apart from both."""
    graph, _ = _graph()
    inside = lambda package: {m for m in graph if m == package or m.startswith(package + ".")}
    rules = {
        "mdpo.data": ("mdpo.models", "mdpo.training", "mdpo.checkpoint"),
        "mdpo.models": ("mdpo.data", "mdpo.training", "mdpo.checkpoint"),
    }
    wrong = sorted(
        (module, dep)
        for package, banned in rules.items()
        for module in inside(package)
        for dep in graph[module]
        if dep.startswith(banned)
    )
    assert not wrong, wrong


def test_config_is_a_leaf():
    graph, _ = _graph()
    config = {m for m in graph if m == "mdpo.config" or m.startswith("mdpo.config.")}
    outside = {(m, d) for m in config for d in graph[m] if d not in config and d != "mdpo.errors" and d != "mdpo"}
    assert not outside, outside


def test_the_rules_catch_a_cycle(tmp_path, monkeypatch):
    """The cycle check itself: a package with a -> b -> a must fail it."""
    pkg = tmp_path / "mdpo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mdpo import b\n")
    (pkg / "b.py").write_text("import mdpo.a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_the_rules_catch_a_deferred_import(tmp_path, monkeypatch):
    pkg = tmp_path / "mdpo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    import json\n    return json\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="json"):
        test_imports_are_at_module_top_except_optional_dependencies()


def test_no_test_module_imports_another():
    """Helpers shared by test modules live in conftest.py (and the fork server in forkserver.py), never in a test
    module another one imports (which would run its module-level fixtures' imports and couple their lifetimes)."""
    tests = Path(__file__).parent
    modules = {p.stem for p in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [(path.name, name) for name in names if name.split(".")[0] in modules]
    assert not found, found


MAX_FUNCTION_LINES = 50


def test_functions_are_short():
    """Every function of the package reads on one screen: at most 50 lines, docstring included."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_modules_are_built_not_retyped():
    """Routers, heads, norms and LoRA layers come from Megatron-Core's specs (or a build hook that fills values):
    nothing in the package changes a module's class after it is built."""
    retyped = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            retyped += [
                f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                for target in targets
                if isinstance(target, ast.Attribute) and target.attr == "__class__"
            ]
    assert not retyped, retyped
