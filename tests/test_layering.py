"""The package's imports go one way (docs/architecture.md): a room imports only rooms below it, and no modules
import each other in a circle. Read from the source with ``ast`` (imports under ``TYPE_CHECKING`` and inside
functions included), so a new module is checked the day it is written."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gateway_guard"

# Lower numbers are lower rooms. Leaves (rank 0) import nothing of the guard's.
RANKS: dict[str, int] = {
    "gateway_guard.errors": 0,
    "gateway_guard.admission.policy": 0,
    "gateway_guard.upstream.saturation": 0,
    "gateway_guard.settings": 1,
    "gateway_guard.admission": 2,
    "gateway_guard.upstream": 2,
    "gateway_guard.telemetry": 3,
    "gateway_guard.app": 4,
    "gateway_guard.cli": 5,
}
# Rooms that stand alone: they import only themselves (guard-dispatch never imports the guard).
ALONE = ("gateway_guard.dispatch", "gateway_guard.sim")


def room(module: str) -> str:
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    for name in ALONE:
        if module == name or module.startswith(name + "."):
            return name
    return "gateway_guard"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                found.add(target)
        graph[name] = {t for t in found if t.startswith("gateway_guard")}
    return graph


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for source, targets in imports().items():
        src = room(source)
        for target in targets:
            dst = room(target)
            if dst == src or src == "gateway_guard":
                continue
            if src in ALONE or dst in ALONE:
                if not (source.startswith("gateway_guard.cli") and dst == "gateway_guard.sim"):
                    wrong.append(
                        f"{source} -> {target} ({src} stands alone)" if src in ALONE else f"{source} -> {target}"
                    )
                continue
            if RANKS.get(dst, 99) >= RANKS.get(src, -1):
                wrong.append(f"{source} -> {target}: {dst} is not below {src}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = imports()
    modules = set(graph)

    def resolve(target: str) -> str | None:  # "from pkg.mod import name" names a module or a package
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its own modules is not a circle of design
    real = [
        c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in itertools.pairwise(c))
    ]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_layering_test_sees_a_wrong_import() -> None:
    """The check itself can fail: admission importing app is caught."""
    assert RANKS[room("gateway_guard.app.proxy")] > RANKS[room("gateway_guard.admission.gate")]
    assert room("gateway_guard.admission.policy") == "gateway_guard.admission.policy"
    assert "gateway_guard.admission.ticket" in imports()
