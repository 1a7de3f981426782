"""The package's structure (DESIGN §2): layers, no import cycles, no private torch APIs, no
process-environment writes, no global plotting state, modules under 500 lines.

Imports are read from the source with `ast`, function-level imports included, so a cycle hidden
inside a function counts. `from pkg import name` is an import of `pkg.name` when that is a
module of the package, else of `pkg` (as import-linter reads it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# Layer of each top-level part of the package: a module may import only its own layer and below.
LAYERS = {
    "core": 0,
    "version": 0,
    "reference": 1,
    "kernels": 2,
    "csrc": 2,
    "ops": 3,
    "model": 4,
    "training": 5,
    "testing": 5,
    "study": 6,
    "bench": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 8,
}
PRIVATE_TORCH = ("torch._C", "torch.utils._python_dispatch", "torch.overrides._")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for pytorch_mqa/ and kernels/ (installed as pytorch_mqa.kernels)."""
    out = {}
    for root, prefix in ((REPO / "pytorch_mqa", "pytorch_mqa"), (REPO / "kernels", "pytorch_mqa.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name) is not None and MODULES[name].name == "__init__.py"


def _imports(name: str, path: Path) -> set[str]:
    """Package modules that `name` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("pytorch_mqa"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def test_every_part_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
    assert not unknown, f"parts of the package without a layer in DESIGN §2: {unknown}"


def test_layers_import_only_downwards():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in GRAPH.items() for d in sorted(deps)
           if _layer(d) > _layer(m) and not (d == "pytorch_mqa.version")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_rules(name):
    path = MODULES[name]
    text = path.read_text(encoding="utf-8")
    n = text.count("\n")
    assert n <= MAX_LINES, f"{path.relative_to(REPO)}: {n} lines, expected at most {MAX_LINES}"
    for api in PRIVATE_TORCH:
        assert api not in text, f"{path.relative_to(REPO)}: uses the private torch API {api}"
    tree = ast.parse(text)
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        assert not isinstance(node, ast.Assert), f"{where}: `assert` used for a run-time check in library code"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func)
            assert target != "matplotlib.use", f"{where}: matplotlib.use switches the user's backend"
            assert target not in ("os.environ.setdefault", "os.environ.update", "os.environ.pop", "os.putenv"), (
                f"{where}: library code writes the process environment ({target})"
            )
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                assert not (isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ"), (
                    f"{where}: library code writes the process environment (os.environ[...])"
                )


def test_checker_sees_function_level_imports(tmp_path):
    """The reader counts an import inside a function (a cycle hidden there is still found)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from pytorch_mqa.model import gpt\n")
    assert _imports("pytorch_mqa.ops.fake", path) == {"pytorch_mqa.model.gpt"}
