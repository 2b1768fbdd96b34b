"""No import cycles in certqueue/ (issue 16): module-level and function-level imports alike (a cycle
hidden inside a function is still a cycle), read from the sources with ``ast``. Imports under
``if TYPE_CHECKING:`` do not run and are left out.

``KNOWN_CYCLES`` lists the cycles not broken yet, each as the set of modules it joins. It only
shrinks: a cycle outside it fails, and so does an entry that no longer matches any cycle (remove
it once the cycle is broken)."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "certqueue"

#: cycles still to break (issue 16 broke the last ones: the CLI's, the task modules', the embedded
#: broker's and the settings' and crypto's); keep it empty
KNOWN_CYCLES: list[frozenset[str]] = []

#: modules that must never be in a cycle, whatever the list above says
ACYCLIC = {
    "config",
    "runtime",
    "runtime_layer",
    "db",
    "settings_keys",
    "logsafe",
    "crypto",
    "validation",
    "csr_fields",
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name (relative to the package, "" for its __init__) -> source file."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, methods, try blocks), except those that
    only run under ``if TYPE_CHECKING:`` (an ``else:`` branch of such an ``if`` does run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports_of(child)
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def graph(root: Path, package: str = "certqueue") -> dict[str, set[str]]:
    """module -> the package's modules it imports (edges to itself left out).

    ``from certqueue import db`` imports the module ``db``; ``from certqueue.config import X``
    imports ``config`` (whatever X is)."""
    mods = modules(root)
    out: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = [package, *mod.split(".")] if mod else [package]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, here, is_pkg, package, mods):
                if target != mod:
                    out[mod].add(target)
    return out


def _targets(
    node: ast.Import | ast.ImportFrom, here: list[str], is_pkg: bool, package: str, mods: Iterable[str]
) -> Iterator[str]:
    known = set(mods)

    def local(dotted: str) -> str | None:
        if dotted == package:
            return ""
        return dotted.removeprefix(package + ".") if dotted.startswith(package + ".") else None

    if isinstance(node, ast.Import):
        for alias in node.names:
            name = local(alias.name)
            if name is not None and name in known:
                yield name
        return
    if node.level:
        base = here if is_pkg else here[:-1]
        base = base[: len(base) - (node.level - 1)]
        absolute = ".".join([*base, *([node.module] if node.module else [])])
    else:
        absolute = node.module or ""
    name = local(absolute)
    if name is None:
        return
    for alias in node.names:
        sub = f"{name}.{alias.name}" if name else alias.name
        if sub in known:
            yield sub
        elif name in known:
            yield name


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    members.add(m)
                    if m == node:
                        break
                if len(members) > 1:
                    found.append(frozenset(members))
    return found


def check(found: list[frozenset[str]], known: list[frozenset[str]], acyclic: set[str]) -> list[str]:
    """What is wrong: a cycle not in ``known``, an acyclic module in a cycle, a stale entry."""
    problems = []
    for cycle in found:
        if cycle & acyclic:
            problems.append(f"must not be in a cycle: {sorted(cycle & acyclic)} (cycle {sorted(cycle)})")
        elif not any(cycle <= entry for entry in known):
            problems.append(f"new import cycle: {sorted(cycle)}")
    for entry in known:
        if not any(cycle <= entry for cycle in found):
            problems.append(f"KNOWN_CYCLES entry {sorted(entry)} is no cycle any more: remove it")
    return problems


def test_certqueue_has_no_import_cycle_but_the_known_ones() -> None:
    problems = check(cycles(graph(PACKAGE)), KNOWN_CYCLES, ACYCLIC)
    assert not problems, "\n".join(problems)


# --- the checker itself -------------------------------------------------------------------------------


def _package(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_counts(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": "def f():\n    from pkg.a import x\n    return x\n",
            "c.py": "from .a import y\n",
        },
    )
    edges = graph(root, "pkg")
    assert edges["a"] == {"b"} and edges["b"] == {"a"} and edges["c"] == {"a"}
    assert cycles(edges) == [frozenset({"a", "b"})]
    assert check(cycles(edges), [], set()) == ["new import cycle: ['a', 'b']"]


def test_type_checking_imports_are_left_out(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
            "c.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import pkg.d\n",
            "d.py": "try:\n    import pkg.c\nexcept ImportError:\n    pass\n",
        },
    )
    edges = graph(root, "pkg")
    assert edges["b"] == set()
    assert cycles(edges) == [frozenset({"c", "d"})]


def test_relative_imports_and_subpackages(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "sub/__init__.py": "from . import x\n",
            "sub/x.py": "from ..top import T\nfrom pkg.sub import y\n",
            "sub/z.py": "from pkg.sub import x\nfrom pkg.sub import NAME\n",  # a name of sub/__init__
            "sub/y.py": "",
            "top.py": "class T: ...\nimport pkg.sub.x\n",
        },
    )
    edges = graph(root, "pkg")
    assert edges["sub"] == {"sub.x"}
    assert edges["sub.x"] == {"top", "sub.y"}
    assert edges["sub.z"] == {"sub.x", "sub"}
    assert edges["top"] == {"sub.x"}
    assert sorted(map(sorted, cycles(edges))) == [["sub.x", "top"]]


def test_the_allowlist_only_shrinks() -> None:
    known = [frozenset({"a", "b", "c"})]
    assert check([frozenset({"a", "b"})], known, set()) == []  # a known cycle that shrank is fine
    assert check([frozenset({"a", "d"})], known, set()) == ["new import cycle: ['a', 'd']", (
        "KNOWN_CYCLES entry ['a', 'b', 'c'] is no cycle any more: remove it")]  # fmt: skip
    assert check([frozenset({"config", "db"})], [frozenset({"config", "db"})], {"config"}) == [
        "must not be in a cycle: ['config'] (cycle ['config', 'db'])"
    ]
