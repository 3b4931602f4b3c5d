"""Arrows inside ``cmkd_core`` point down: each placed package imports only packages on its own
floor or below (imports inside functions count). Packages not yet placed (``config``,
``distill``, ``export``, ``benchmark``, ``bench_summary``, ``metrics``: ``config`` and
``distill`` still import each other, issue 24) are left out until they are."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS = (
    {"frontend"},
    {"data", "tensorfile"},
    {"models", "bank"},
    {"align", "teachers", "text", "deploy"},
)
"""``cmkd_core``'s sub-packages, bottom floor first."""


def package_imports(root: Path, top: str) -> dict[str, set[str]]:
    """For each sub-package (or module) ``P`` of the package folder ``root`` named ``top``:
    the sub-packages it imports anywhere in its files (``from top.Q ...`` or ``import top.Q``)."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts == ("__init__",):
            continue
        mine = found.setdefault(parts[0], set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                bits = name.split(".")
                if bits[0] == top and len(bits) > 1 and bits[1] != parts[0]:
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


def test_every_arrow_between_placed_core_packages_points_down():
    imports = package_imports(ROOT / "cmkd_core", "cmkd_core")
    placed = set().union(*FLOORS)
    assert placed <= set(imports), placed - set(imports)  # a renamed package fails here
    assert arrows_up(imports, FLOORS) == []


def test_a_planted_arrow_up_is_found(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "data" / "x.py").write_text("def f():\n    from cmkd_core.bank import B\n")
    (tmp_path / "bank.py").write_text("from cmkd_core.data import x\n")
    imports = package_imports(tmp_path, "cmkd_core")
    assert imports == {"data": {"bank"}, "bank": {"data"}}
    assert arrows_up(imports, FLOORS) == ["data -> bank"]


def test_benchmark_scripts_import_no_flow_and_do_not_import_each_other_in_a_circle():
    """bench/ is beside the pipeline, not on top of it: its scripts use the core (the grid's
    command is `cmkd bench`)."""
    scripts = {p.stem: p for p in (ROOT / "bench").glob("*.py")}
    imports = {}
    for name, path in scripts.items():
        tree = ast.parse(path.read_text(), str(path))
        found = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
            for alias in (node.names if isinstance(node, ast.Import) else [None])
        }
        assert "flows" not in found, f"bench/{name}.py imports flows"
        imports[name] = found & set(scripts)
    for name, targets in imports.items():
        for other in targets:
            assert name not in imports[other], f"bench/{name}.py and bench/{other}.py"
