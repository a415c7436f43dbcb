"""The package's structure: no import cycles among module-level imports (the grid's planner and its
stage runners once imported each other; stage naming now lives in the leaf ``stage_names``)."""
from __future__ import annotations

import ast
from pathlib import Path

import peftguard

PACKAGE = Path(peftguard.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports at module level (imports inside functions run later, on call)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from peftguard import caches`
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: module_level_imports(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycles_among_module_level_imports() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_grid_modules() -> None:
    graph = import_graph()
    assert "peftguard.stage_names" in graph["peftguard.stages"] and "peftguard.config" in graph["peftguard.experiment"]
    assert graph["peftguard.stage_names"] == set()  # a leaf


def test_caches_clear_empties_every_process_wide_cache_and_forget_a_defenses_memo(data_dir) -> None:
    from peftguard import caches, inference, pipeline, stages

    assert {"inference.encodings", "pipeline.defenses", "pipeline.scored", "stages.datasets"} <= set(caches.registered())
    inference._ENCODING_CACHE[("tokenizer", 8, "digest")] = ([[1]], 0)
    pipeline._DEFENSES[("psim",)] = object()
    pipeline._SCORED[("onion",)] = {"a text": 0.9}
    stages._dataset.cache_clear()
    stages._dataset("sst2", str(data_dir))
    caches.clear()
    assert not inference._ENCODING_CACHE and not pipeline._DEFENSES and not pipeline._SCORED and stages._dataset.cache_info().currsize == 0

    class Scored:
        _memo = {"a text": 0.9}

    holder = Scored()
    caches.forget(holder)
    assert holder._memo == {}
