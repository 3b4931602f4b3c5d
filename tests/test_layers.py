"""Every arrow points down (docs/architecture.md).

The packages are floors: ``cmkd_app`` (the command layer) on top, then ``flows``, ``tasks`` and
``cmkd_core``; ``bench`` stands beside them and uses the core only. Inside ``cmkd_core`` the
sub-packages are floors too (:data:`FLOORS`). A package imports only its own floor or those
below, wherever the import is written (inside functions and ``TYPE_CHECKING`` blocks count),
and no modules import each other in a circle (imports that run only under ``TYPE_CHECKING``
do not count: they never load a module). Each check is shown to fail on a planted violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("cmkd_core", "tasks", "flows", "cmkd_app")
"""The top-level packages, bottom first: each may import those before it."""

BESIDE = {"bench": {"cmkd_core"}}
"""Folders beside the floors and the packages they may import."""

FLOORS = (
    {"frontend", "metrics"},
    {"data"},
    {"tensorfile", "deploy"},
    {"models", "bank"},
    {"align", "teachers"},
    {"distill"},
    {"config"},
    {"recipes", "export", "text"},
    {"benchmark"},
)
"""``cmkd_core``'s sub-packages, bottom floor first. ``config`` sits above ``distill``: it checks
method and encoder names against their registries, and the code it configures never reads it
(each method takes its settings at construction); ``recipes`` turns params into runs."""


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node inside an ``if TYPE_CHECKING:`` block of ``tree``."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for n in ast.walk(node))
    return inside


def imported(path: Path, modules: set[str], at_run_time: bool = False) -> Iterator[str]:
    """What the file at ``path`` imports, anywhere in it: module names; ``from P import m``
    of a module ``P.m`` (one of ``modules``) is ``P.m`` alone. ``at_run_time`` leaves out the
    imports under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree) if at_run_time else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            if not all(sub in modules for sub in subs):
                yield node.module
            yield from (sub for sub in subs if sub in modules)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def module_files(root: Path, tops: tuple[str, ...]) -> dict[str, Path]:
    """Every Python module under the folders ``tops`` of ``root``, by dotted name."""
    found = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def arrows_across(root: Path) -> list[str]:
    """Every import from a top-level package (or a folder beside them) to one it may not
    import, as ``module -> imported``."""
    files = module_files(root, (*PACKAGES, *BESIDE))
    allowed = {top: set(PACKAGES[: i + 1]) for i, top in enumerate(PACKAGES)}
    allowed.update({top: {top, *targets} for top, targets in BESIDE.items()})
    ours = {*PACKAGES, *BESIDE}
    bad = []
    for name, path in files.items():
        for target in imported(path, set(files)):
            top = target.split(".")[0]
            if top in ours and top not in allowed[name.split(".")[0]]:
                bad.append(f"{name} -> {target}")
    return sorted(set(bad))


def core_imports(root: Path) -> dict[str, set[str]]:
    """For each sub-package (or module) of ``root/cmkd_core``: the others it imports."""
    files = module_files(root, ("cmkd_core",))
    found: dict[str, set[str]] = {}
    for name, path in files.items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        mine = found.setdefault(parts[1], set())
        for target in imported(path, set(files)):
            bits = target.split(".")
            if bits[0] == "cmkd_core" and len(bits) > 1 and bits[1] != parts[1]:
                mine.add(bits[1])
    return found


def arrows_up(imports: dict[str, set[str]], floors: tuple[set[str], ...]) -> list[str]:
    """Every import from a placed package to a package on a higher floor, as ``a -> b``."""
    floor = {name: level for level, names in enumerate(floors) for name in names}
    return sorted(
        f"{a} -> {b}"
        for a, targets in imports.items()
        for b in targets
        if a in floor and b in floor and floor[b] > floor[a]
    )


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The circles of the directed graph ``edges`` found by a depth-first walk, each as the
    path that closes it (``[a, b, a]``)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return found


def module_graph(root: Path) -> dict[str, set[str]]:
    """Which of the project's modules each one imports when it runs."""
    files = module_files(root, (*PACKAGES, *BESIDE))
    bench = {p.stem: f"bench.{p.stem}" for p in (root / "bench").glob("*.py")}  # run as scripts
    edges = {}
    for name, path in files.items():
        targets = {
            bench.get(t, t) if name.startswith("bench.") else t
            for t in imported(path, set(files), at_run_time=True)
        }
        edges[name] = {t for t in targets if t in files and t != name}
    return edges


def test_the_packages_import_only_downwards_and_bench_only_the_core():
    assert arrows_across(ROOT) == []


def test_every_arrow_between_core_packages_points_down():
    imports = core_imports(ROOT)
    placed = set().union(*FLOORS)
    assert set(imports) == placed  # a new or renamed package must be placed on a floor
    assert arrows_up(imports, FLOORS) == []
    assert circles(imports) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(module_graph(ROOT)) == []


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_planted_violations_are_found(tmp_path):
    _plant(
        tmp_path,
        {
            "cmkd_core/__init__.py": "",
            "cmkd_core/data/__init__.py": "",
            "cmkd_core/data/x.py": "def f():\n    from cmkd_core.bank import B\n",
            "cmkd_core/bank.py": "from cmkd_core.data import x\n",
            "tasks/__init__.py": "",
            "tasks/t.py": "def g():\n    from cmkd_app.cli import main\n",
            "flows/__init__.py": "",
            "flows/f.py": "from tasks import t\n",
            "cmkd_app/__init__.py": "",
            "cmkd_app/cli.py": "from flows import f\n",
            "bench/b.py": "from flows.f import x\nfrom c import y\n",
            "bench/c.py": "from b import z\n",
        },
    )
    assert arrows_across(tmp_path) == ["bench.b -> flows.f", "tasks.t -> cmkd_app.cli"]
    imports = core_imports(tmp_path)
    assert imports == {"data": {"bank"}, "bank": {"data"}}
    assert arrows_up(imports, FLOORS) == ["data -> bank"]
    assert circles(imports) == [["bank", "data", "bank"]]
    found = {frozenset(circle) for circle in circles(module_graph(tmp_path))}
    assert found == {
        frozenset({"bench.b", "bench.c"}),
        frozenset({"cmkd_app.cli", "flows.f", "tasks.t"}),
        frozenset({"cmkd_core.bank", "cmkd_core.data.x"}),
    }


def test_an_import_under_type_checking_is_an_arrow_but_not_a_circle(tmp_path):
    _plant(
        tmp_path,
        {
            "cmkd_core/__init__.py": "",
            "cmkd_core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from cmkd_core import b\n",
            "cmkd_core/b.py": "from cmkd_core import a\n",
        },
    )
    assert module_graph(tmp_path) == {
        "cmkd_core": set(),
        "cmkd_core.a": set(),
        "cmkd_core.b": {"cmkd_core.a"},
    }
    assert core_imports(tmp_path) == {"a": {"b"}, "b": {"a"}}
