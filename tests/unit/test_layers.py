"""The package's layer order: every module imports only from its own layer or a lower one.

Layers, lowest first (README "Development" states the same order):

    base        errors, progress, version, devices
    formats     formats/ (per-layer formats and policies, presets, serving targets: data)
    config      config, artifacts, distributed
    numerics    numerics, audio (shared numerics; mel/STFT/resampling)
    models      models/ (one adapter per family, the reference model's definition)
    calibration calibration/
    quantize    quantize/ (ModelOpt quantization, sensitivity, the mixed search, the stage)
    export      export/ (ONNX, graph passes, FP16 export)
    engines     engines/
    eval        eval/ (embedders, FD statistics, gate, scoring, harness, report, figures)
    runtime     runtime/ (the torch-free bundle runtime, when it lands)
    stages      stages/ (the runner, the public stage functions, build, generate, bundle), serving/,
                inspect, ci_gate; reference/ (corpus and training recipe: tooling on top of the runtime,
                which no runtime module imports)
    api         the package root: the lazy public API (names resolve on first use)
    cli         cli, __main__

Imports are read with ``ast`` from every module: top-level and function-level ``import
adm_export.x`` / ``from adm_export.x import y``. There must be no import cycle between modules,
neither at import time (top level) nor through function-level imports. Only ``cli.py`` may import
click, and no module outside ``reference/`` imports the reference tooling.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "adm_export"

#: (layer, module prefixes), lowest layer first. A module belongs to the layer of its longest
#: matching prefix; the package root ``adm_export`` matches only itself.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("adm_export.errors", "adm_export.progress", "adm_export.version", "adm_export.devices")),
    ("formats", ("adm_export.formats",)),
    ("config", ("adm_export.config", "adm_export.artifacts", "adm_export.distributed")),
    ("numerics", ("adm_export.numerics", "adm_export.audio")),
    ("models", ("adm_export.models",)),
    ("calibration", ("adm_export.calibration",)),
    ("quantize", ("adm_export.quantize",)),
    ("export", ("adm_export.export",)),
    ("engines", ("adm_export.engines",)),
    ("eval", ("adm_export.eval",)),
    ("runtime", ("adm_export.runtime",)),
    ("stages", ("adm_export.stages", "adm_export.serving", "adm_export.inspect", "adm_export.ci_gate",
                "adm_export.reference")),
    # The root is the lazy public API: its names come from the stages (the reader sees its
    # TYPE_CHECKING imports as nothing; it resolves them with importlib on first use).
    ("api", ("adm_export",)),
    ("cli", ("adm_export.cli", "adm_export.__main__")),
]

#: Upward imports that are allowed, each lazy (inside a function) and with the reason.
#: (importing module prefix, imported module prefix) -> why.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    # The export's parity check runs the exported file in the same ONNX Runtime session the engine
    # stage builds (engines.onnxruntime), so what parity measures is what the engine will run.
    ("adm_export.export.onnx", "adm_export.engines.onnxruntime"): "parity check through the engine's session",
    ("adm_export.export.fp16", "adm_export.engines.onnxruntime"): "parity check through the engine's session",
    ("adm_export.export.parity", "adm_export.engines.onnxruntime"): "parity check through the engine's session",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "adm_export" and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, found = len(prefix), i
    if found is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS in {__file__}")
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(module: str, path: Path, source: str | None = None) -> list[tuple[str, int, bool]]:
    """``(imported adm_export module, line, at top level)`` for every import in the module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top = False
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "adm_export" or alias.name.startswith("adm_export."):
                    found.append((alias.name, node.lineno, top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src == "adm_export" or src.startswith("adm_export."):
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    found.append((sub if sub in MODULES else src, node.lineno, top))
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(ast.parse(path.read_text() if source is None else source, str(path)), True)
    return found


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _exception(importer: str, imported: str) -> tuple[str, str] | None:
    """The ``ALLOWED_UPWARD`` key covering this import, if any."""
    for src, dst in ALLOWED_UPWARD:
        if (importer == src or importer.startswith(src + ".")) and (imported == dst or imported.startswith(dst + ".")):
            return src, dst
    return None


def _upward(module: str, imports: list[tuple[str, int, bool]], used: set | None = None) -> list[str]:
    """The imports of ``module`` that point to a higher layer and are not allowed exceptions."""
    bad = []
    for imported, line, top in imports:
        if _layer(imported) <= _layer(module):
            continue
        key = _exception(module, imported)
        if key is not None and not top:
            if used is not None:
                used.add(key)
            continue
        where = MODULES[module].relative_to(ROOT.parent) if module in MODULES else module
        bad.append(f"{where}:{line}: {module} ({LAYERS[_layer(module)][0]}) imports {imported} "
                   f"({LAYERS[_layer(imported)][0]})" + (" at top level (the exception covers lazy imports only)"
                                                          if key else ""))
    return bad


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_point_to_the_same_or_a_lower_layer():
    used: set = set()
    upward = [line for module, imports in IMPORTS.items() for line in _upward(module, imports, used)]
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = sorted(set(ALLOWED_UPWARD) - used)
    assert not stale, f"exceptions no longer needed; remove them from ALLOWED_UPWARD: {stale}"


@pytest.mark.parametrize("source, imported, top, upward", [
    ("from adm_export.eval import fd\n", "adm_export.eval.fd", True, True),
    ("from adm_export.eval.embedders.base import Embedder\n", "adm_export.eval.embedders.base", True, True),
    ("import adm_export.engines.stage\n", "adm_export.engines.stage", True, True),
    ("def f():\n    from adm_export.quantize.modelopt import load_quantized\n", "adm_export.quantize.modelopt",
     False, True),
    ("class A:\n    from adm_export.cli import cli\n", "adm_export.cli", True, True),
    ("from adm_export.formats.policy import LayerPlan\n", "adm_export.formats.policy", True, False),
    ("from adm_export.models import base\n", "adm_export.models.base", True, False),
])
def test_the_import_reader_sees_every_form(source, imported, top, upward):
    """The checks are only as good as the reader: module and name imports, top-level and lazy ones."""
    probe = "adm_export.models._probe"  # a module of the models layer (never written)
    found = _imports(probe, ROOT / "models" / "_probe.py", source)
    assert [(i, t) for i, _, t in found] == [(imported, top)]
    assert bool(_upward(probe, found)) == upward


def test_the_exceptions_cover_only_lazy_imports():
    src, dst = next(iter(ALLOWED_UPWARD))
    assert not _upward(src, [(dst, 1, False)])
    assert _upward(src, [(dst, 1, True)])


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module)
    return cycles


@pytest.mark.parametrize("lazy", [False, True], ids=["top-level imports", "lazy imports too"])
def test_no_import_cycles(lazy):
    """No loops between modules: at import time (top level), nor through imports inside functions
    (the export <-> quantize <-> sensitivity loops were of that kind)."""
    graph = {m: sorted({i for i, _, top in imports if (top or lazy) and i != m}) for m, imports in IMPORTS.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_loop():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_runtime_never_imports_the_reference_tooling():
    offenders = [f"{m} imports {i}" for m, imports in IMPORTS.items() if not m.startswith("adm_export.reference")
                 for i, _, _ in imports if i == "adm_export.reference" or i.startswith("adm_export.reference.")]
    assert not offenders, offenders


def test_only_the_cli_imports_click():
    offenders = []
    for module, path in MODULES.items():
        if module == "adm_export.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{module}:{node.lineno}" for n in names if n == "click" or n.startswith("click.")]
    assert not offenders, f"click imported outside cli.py: {offenders}"
