"""The house rules of docs/ARCHITECTURE.md, checked on the source: imports flow one way
(no cycle), no module grows past 500 lines, SQL is built only under store/, no private
name crosses a module boundary, and POST /token has one entry."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "token_exchange"
MAX_LINES = 500
SQL_BUILDERS = {"select", "insert", "update", "delete", "Session", "text", "func", "bindparam"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module: str, path: Path):
    """(imported module, names) for each import at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            yield _resolve(module, path, node), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _all_imports(module: str, path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield _resolve(module, path, node), [a.name for a in node.names]


def test_the_import_graph_has_no_cycle():
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target, names in _top_level_imports(name, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    deps.add(candidate)
                    break
        graph[name] = deps
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"
    for node in graph:
        if node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["token_exchange", "bench"])
def test_no_module_is_over_500_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_sql_is_built_outside_store():
    offenders = []
    for name, path in _modules():
        # store/ runs the service's SQL; models declares the tables; db is the engine and
        # Alembic's migrations (their advisory lock).
        if name.startswith("token_exchange.store") or name in ("token_exchange.models", "token_exchange.db"):
            continue
        for target, names in _all_imports(name, path):
            if target.startswith("sqlalchemy") and SQL_BUILDERS & set(names):
                offenders.append(f"{name} imports {sorted(SQL_BUILDERS & set(names))} from {target}")
    assert not offenders, offenders


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{name}: from {target} import {n}"
                 for name, path in _modules() for target, names in _all_imports(name, path)
                 if target.startswith("token_exchange") for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_post_token_has_one_handler():
    """endpoints.TokenEndpoint is the only code that answers POST /token."""
    from token_exchange import endpoints
    source = (PACKAGE / "endpoints.py").read_text()
    assert source.count("class TokenEndpoint") == 1
    assert '@bp.post("/token")' not in source and "@bp.route(\"/token\"" not in source
    assert not hasattr(endpoints, "token")


def test_every_package_is_listed_for_the_wheel():
    """setup.cfg lists packages by name: a new subpackage left out would be missing from the wheel."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"missing from setup.cfg [options] packages: {sorted(found - listed)}"
