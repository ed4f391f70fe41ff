"""The package layout keeps its promises: the serving side never imports torch, parameters
flow down from the CLI (nothing under dexml/ imports it), no two modules import each other, and a
missing optional package is named with the extra that provides it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dexml"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dexml_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dexml"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dexml"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_everything_under_serve_imports_without_torch_or_transformers():
    serve = sorted(m for m in MODULES if m.startswith("dexml.serve"))
    assert "dexml.serve.predictor" in serve
    code = ("import importlib, sys\n"
            f"for m in {serve!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
            "print(bad[:5])\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"importing dexml.serve pulled in {proc.stdout.strip()} {proc.stderr[-2000:]}"


def test_no_library_module_imports_the_cli():
    offenders = [m for m, p in MODULES.items() if m != "dexml.cli" and "dexml.cli" in dexml_imports(p)]
    assert not offenders, f"params must flow down from dexml.cli, but these import it: {offenders}"


def test_no_two_modules_import_each_other():
    graph = {m: {i for i in dexml_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package's __init__ is imported by its submodules' imports; only module-to-module edges count
    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                     if a in graph.get(b, set()) and not (MODULES[a].name == "__init__.py" or MODULES[b].name == "__init__.py")})
    assert not cycles, f"modules importing each other: {cycles}"


def test_serving_side_never_imports_the_training_side():
    offenders = [(m, i) for m, p in MODULES.items() if m.startswith("dexml.serve")
                 for i in dexml_imports(p) if i.startswith(("dexml.train", "dexml.pipeline"))]
    assert not offenders, f"dexml.serve must stand alone (torch-free, no pipeline): {offenders}"


def _without(module: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`dexml ARGV` in a fresh interpreter in which `module` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from dexml.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)



@pytest.mark.parametrize("module,argv", [
    ("faiss", ["index"]),
    ("faiss", ["evaluate"]),
    ("faiss", ["predict", "--bundle", "nowhere", "a text"]),
    ("onnxruntime", ["export"]),
    ("onnxruntime", ["predict", "--bundle", "nowhere", "a text"]),
])
def test_a_missing_optional_dependency_names_the_extra_at_every_entry_point(module, argv, tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _without(module, argv, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{module} is not installed: pip install 'dexml[cpu]'" in proc.stderr
    assert "Traceback" not in proc.stderr
