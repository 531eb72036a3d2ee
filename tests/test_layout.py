"""The package layout's rules, read from the code's own imports (every import, function-level ones too).

- no import circles anywhere;
- ``wire`` imports nothing else of securechat (not even the package's face);
- ``pki`` and ``store`` know nothing of chat sessions: neither imports ``server`` or ``client``, nor each other;
- ``server`` and ``client`` never import each other;
- every module says what it is in its first line, and none grows past ~700 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "securechat"

# Which top-level parts of the package each part may import (besides itself). "" is the package's
# face (securechat/__init__.py, cli.py, __main__.py).
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "pki": {"wire"},
    "store": {"wire"},
    "server": {"wire", "pki", "store"},
    "client": {"wire", "pki"},
    "": {"wire", "pki", "store", "server", "client"},
}

# A module past this many lines is doing more than one job (the layout issue's bound).
MAX_LINES = 700


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every securechat module ``path`` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = root.name
    me = module_name(path, root)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] != top:
                continue
            for alias in node.names:  # "from pkg import mod" imports the module, not only the package
                candidate = f"{module}.{alias.name}"
                if (root.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                        (root.parent / Path(*candidate.split(".")) / "__init__.py").is_file():
                    found.add(candidate)
                else:
                    found.add(module)
    found.discard(me)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        mine = part_of(module)
        for target in sorted(targets):
            theirs = part_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                out.append(f"{module} -> {target}")
    return out


def test_no_import_circles() -> None:
    assert circles(import_graph(PACKAGE)) == []


def test_parts_import_only_downwards() -> None:
    assert forbidden(import_graph(PACKAGE)) == []


def test_every_part_exists_and_holds_modules() -> None:
    graph = import_graph(PACKAGE)
    for part in ("wire", "pki", "store", "server", "client"):
        assert any(m.startswith(f"securechat.{part}.") for m in graph), part


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_says_what_it_is_and_stays_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines; split it by job"
    if path.name == "__init__.py" and not text.strip():
        return
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{path.name}: the first line should say what the module is"


# -- the checks above can fail: they are run here on small packages built to break each rule -----


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "securechat"
    for name, body in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


def test_a_circle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "client/__init__.py": "",
        "client/a.py": "from securechat.client import b\n",
        "client/b.py": "def f():\n    from securechat.client.a import x\n",
    })
    assert circles(import_graph(root)) == [["securechat.client.a", "securechat.client.b"]]


def test_server_importing_client_and_wire_importing_anything_are_found(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "wire/__init__.py": "", "server/__init__.py": "", "client/__init__.py": "", "pki/__init__.py": "",
        "wire/proto.py": "from securechat import DEFAULT_PORT\nfrom securechat.pki import ca\n",
        "pki/ca.py": "",
        "client/ui.py": "",
        "server/engine.py": "from securechat.client import ui\nfrom securechat.wire import proto\n",
    })
    graph = import_graph(root)
    assert forbidden(graph) == [
        "securechat.server.engine -> securechat.client.ui",
        "securechat.wire.proto -> securechat",
        "securechat.wire.proto -> securechat.pki.ca",
    ]
