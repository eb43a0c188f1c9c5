"""The import graph, read from the code (ast): layers point down, no import circles, in-house imports at module
top, and tests that import neither each other nor benchmarks/. DESIGN.md's "Layers" section draws the same."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IN_HOUSE = ("nanoray", "serve", "jobs")

# Every module's layer; an import may point to its own layer or a lower one. A new module goes into this table.
LAYERS = [
    # 0: no nanoray dependencies outside this layer
    ["nanoray.hardware", "nanoray.storage", "nanoray.kernels", "nanoray.scaling", "nanoray.scaling.surface"],
    # 1: the pieces: model, dial, data, tokenizer, checkpoints, CORE tasks, the report
    ["nanoray.model", "nanoray.dial", "nanoray.optim", "nanoray.tokenizer", "nanoray.corpus", "nanoray.evaluate",
     "nanoray.data", "nanoray.position", "nanoray.checkpoint", "nanoray.fused_decode", "nanoray.report",
     "nanoray.core_data", "nanoray.core_data.bundle", "nanoray.core_data.bigbench", "nanoray.dev",
     "nanoray.dev.procs", "nanoray.dev.cluster", "nanoray.trackers", "nanoray.scaling.predict",
     "nanoray.scaling.__main__", "nanoray.fp8"],
    # 2: what runs on Ray's workers: the stream, the trainer, the engine, CORE
    ["nanoray.stream", "nanoray.session", "nanoray.train", "nanoray.engine", "nanoray.core_eval"],
    # 3: a family: the Tune sweep and its results
    ["nanoray.sweep", "nanoray.family"],
    # 4: the applications
    ["serve", "serve.*", "jobs.*"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in IN_HOUSE for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module top) for every in-house import of a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            known = modules()
            # `from nanoray import kernels` imports the module nanoray.kernels
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found += [(n, node.lineno, id(node) in top) for n in dict.fromkeys(names) if n.split(".")[0] in IN_HOUSE]
    return found


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names or any(n.endswith(".*") and name.startswith(n[:-1]) for n in names):
            return i
    raise AssertionError(f"{name}: not in tests/test_layers.py's LAYERS; give the new module its layer")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {n for n, _, _ in imports(path) if n in known and n != name} for name, path in known.items()}


def test_every_import_points_to_the_same_layer_or_below():
    wrong = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
             for name, deps in graph().items() for dep in deps if layer(dep) > layer(name)]
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_its_applications():
    wrong = [f"{name} imports {dep}" for name, deps in graph().items() if name.startswith("nanoray")
             for dep in deps if not dep.startswith("nanoray")]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    deps, state, circles = graph(), {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(deps[name]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(deps):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_in_house_imports_are_at_module_top():
    local = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in modules().values()
             for name, line, at_top in imports(path) if not at_top]
    assert not local, "\n".join(local)


def test_tests_import_neither_each_other_nor_benchmarks():
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{path.name}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in ("benchmarks", "conftest") or n.startswith("test_")]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above read real imports: a function-local import and an upward one are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom nanoray import sweep\n\ndef f():\n    from serve.app import build\n")
    assert imports(bad) == [("nanoray.sweep", 2, True), ("serve.app", 5, False)]
    assert layer("nanoray.dial") < layer("nanoray.sweep") < layer("serve.app")
