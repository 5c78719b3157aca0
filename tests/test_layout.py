"""The package's shape: a torch-free signal and corpus path, no import cycles, no reference to data outside
the repository, and every module saying what it is for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cbramod_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def test_no_import_cycles_in_the_package():
    # Imports inside functions count too: a lazy import still ties the two modules together.
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    extensions = {_module_name(p) for p in PACKAGE.rglob("*.pyi")}  # compiled modules: leaves of the graph
    graph = {name: _imports(path, name, set(files) | extensions) & set(files) for name, path in files.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


CORPUS_PATH = "cbramod_fast.readers, cbramod_fast.corpus.build, cbramod_fast.corpus.windows, cbramod_fast.corpus.merge"


@pytest.mark.parametrize("modules", ["cbramod_fast.signal", CORPUS_PATH])
def test_signal_and_corpus_building_do_not_load_torch(modules):
    # A fresh interpreter: this test process has torch loaded already. Run outside the checkout so the
    # installed package is the one imported.
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_api_is_loaded_on_use():
    import cbramod_fast
    from cbramod_fast.model import PRESETS, CBraMod, CBraModConfig, ReferenceCBraMod

    assert (cbramod_fast.CBraMod, cbramod_fast.CBraModConfig, cbramod_fast.PRESETS,
            cbramod_fast.ReferenceCBraMod) == (CBraMod, CBraModConfig, PRESETS, ReferenceCBraMod)
    assert set(cbramod_fast.__all__) <= set(dir(cbramod_fast))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cbramod_fast.nothing  # noqa: B018


def test_the_package_refers_to_no_data_outside_it():
    hits = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "../shared" in line or "shared/data" in line]
    assert not hits, f"references to data outside the package: {hits}"


def test_every_python_file_says_what_it_is_for():
    files = [p for d in ("cbramod_fast", "tests", "bench", "experiments") for p in (REPO / d).rglob("*.py")]
    missing = [str(p.relative_to(REPO)) for p in files if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"files without an opening docstring: {missing}"
