"""The layout shows the pipeline: each folder imports only the layers below it, the TensorRT
builder reaches no training or pass module, no private name crosses modules, and modules and
functions stay readable in size. Read from the source with `ast` (function-level imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "calibration", "benchmarks")

# Layer of each module prefix, lowest first: a module may import its own layer and those below.
LAYERS = [
    ("compiler.settings", 0), ("compiler.errors", 0), ("compiler.artifacts", 0), ("compiler", 0),
    ("compiler.graph", 1),
    ("calibration", 2), ("compiler.eval.fp16_reference", 2), ("compiler.eval.fidelity", 2),
    ("compiler.eval.reference_outputs", 2),
    ("compiler.build", 2),
    ("compiler.passes", 3),
    ("compiler.quant", 4),
    ("compiler.training", 5), ("compiler.eval", 5),
    ("compiler.pipeline", 6), ("compiler.results", 6), ("compiler.stages", 6), ("compiler.deploy", 6),
    ("compiler.cli", 7), ("compiler.__main__", 7), ("compiler.matrix", 7),
    ("benchmarks", 8),
]
# The builder runs on a deployment host: graph analysis and the foundation only.
BUILD_MAY_IMPORT = ("compiler.build", "compiler.graph", "compiler.settings", "compiler.errors", "compiler.artifacts")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Named exceptions, each with its reason.
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def layer(name: str) -> int:
    best = max((p for p, _ in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def project_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of a project module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return out


def resolved(module: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """`from pkg import sub` names a submodule when pkg.sub is a module."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    return subs or [module]


def test_every_import_goes_down_the_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        for module, names, line in project_imports(path):
            for target in resolved(module, names, known):
                if layer(target) > layer(name):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer(target)} > "
                                 f"{layer(name)})")
    assert not wrong, "\n".join(wrong)


def test_builder_reaches_no_training_pass_or_quant_module():
    known = modules()
    reached, todo = set(), [n for n in known if n.startswith("compiler.build")]
    while todo:  # transitively: what the builder's imports import
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for module, names, _ in project_imports(known[name]):
            todo += [t for t in resolved(module, names, known) if t in known]
    outside = sorted(n for n in reached if not n.startswith(BUILD_MAY_IMPORT) and n != "compiler")
    assert not outside, f"compiler/build reaches {outside}"


def test_no_module_import_cycle():
    known = modules()
    graph = {n: {t for m, names, _ in project_imports(p) for t in resolved(m, names, known) if t in known}
             for n, p in known.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for t in graph[n] - {n}:
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(t):] + [t])}")
            if t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_no_private_name_crosses_modules():
    crossing = []
    for name, path in modules().items():
        for module, names, line in project_imports(path):
            crossing += [f"{path.relative_to(ROOT)}:{line} imports {module}.{n}" for n in names
                         if n.startswith("_") and module != name]
    assert not crossing, "\n".join(crossing)


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES and name not in LONG_MODULES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if length > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


@pytest.mark.parametrize("name", ["compiler", "compiler.build.engine", "compiler.settings", "compiler.cli",
                                  "compiler.pipeline", "compiler.deploy.runtime", "compiler.deploy.plan",
                                  "compiler.deploy.checks", "compiler.deploy.triton", "compiler.deploy.bundle"])
def test_light_modules_import_neither_torch_nor_tensorrt(name):
    import subprocess
    import sys

    code = (f"import sys, importlib; importlib.import_module({name!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorrt', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"{name} imports {out.stdout.strip()}"


def test_no_source_file_is_git_ignored():
    """An ignore rule must not hide a module from the commit (a `build/` rule once hid compiler/build/)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    hidden = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", *PACKAGES,
                             "tests"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not [p for p in hidden if p.endswith((".py", ".md"))], hidden


def test_every_test_file_is_collected():
    """No test folder is skipped by pytest's collection rules (its default skips `build/`)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu or not gpu"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert on_disk <= collected, sorted(on_disk - collected)
