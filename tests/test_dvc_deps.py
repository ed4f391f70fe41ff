"""dvc.yaml's code dependencies are honest: every dexml module a stage can import (its import
closure, function-level imports included) is listed, as the file or a directory above it, and
nothing listed under dexml/ is outside the closure (which would rerun a stage for nothing).

A stage script calls `dexml.cli.main([stage])`, which imports the stage's module by name
(COMMANDS); the closure starts from both. Imports inside a module-level `__getattr__` (the lazy
`dexml.Predictor`) run only when that attribute is used, which no stage does.

A change to any module a stage runs must make `dvc repro` rerun that stage; DVC only knows
what `deps:` says, so this test is what keeps the promise."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """dexml.a.b -> dexml/a/b.py or dexml/a/b/__init__.py (None for non-dexml modules)."""
    if name != "dexml" and not name.startswith("dexml."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """dexml modules `path` imports anywhere (top level or inside functions), with their packages."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from dexml.serve import rae` imports the submodule dexml.serve.rae
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # packages run their __init__
    return {m for m in out if module_file(m) is not None}


def closure(*entries: Path) -> set[Path]:
    """Files of every dexml module reachable from `entries`."""
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(m) for m in imported_modules(path))
    return {p.relative_to(REPO) for p in seen if p.is_relative_to(REPO / "dexml")}


def stage_code_deps(stage: dict) -> list[Path]:
    return [Path(d) for d in stage.get("deps", []) if str(d).startswith(("dexml", "stages"))]


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_closure(name: str) -> set[Path]:
    from dexml.cli import COMMANDS

    module = COMMANDS[name].module.split(".")
    packages = [module_file(".".join(module[:i])) for i in range(1, len(module) + 1)]
    return closure(REPO / "stages" / f"{name}.py", *packages)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_lists_every_module_it_imports(name):
    deps = stage_code_deps(STAGES[name])
    assert Path(f"stages/{name}.py") in deps, f"dvc.yaml stage {name}: add stages/{name}.py to its deps"
    needed = stage_closure(name)
    missing = sorted(str(f) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {name} runs these modules but does not list them in deps: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_lists_nothing_it_does_not_run(name):
    needed = stage_closure(name)
    extra = [str(d) for d in stage_code_deps(STAGES[name])
             if str(d).startswith("dexml") and not any(f == d or d in f.parents for f in needed)]
    assert not extra, f"dvc.yaml stage {name} lists code it never imports (reruns for nothing): {extra}"


def test_closure_follows_function_level_and_package_imports(tmp_path):
    # the pipeline's evaluate stage imports the Predictor inside the serving package
    files = stage_closure("evaluate")
    assert Path("dexml/serve/predictor.py") in files and Path("dexml/serve/__init__.py") in files
    assert Path("dexml/train/loop.py") not in files  # evaluating never runs training code


def suggested_deps(name: str) -> list[str]:
    """The code deps a stage needs: its closure, whole directories where it uses every module."""
    files = stage_closure(name)
    by_dir: dict[Path, set[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, set()).add(f)
    deps = [f"stages/{name}.py"]
    for d, fs in sorted(by_dir.items(), key=lambda kv: (len(kv[0].parts), str(kv[0]))):
        whole = {p.relative_to(REPO) for p in (REPO / d).glob("*.py")}
        deps += [str(d)] if d != Path("dexml") and fs == whole else sorted(map(str, fs))
    return deps


if __name__ == "__main__":  # `python tests/test_dvc_deps.py`: print what each stage's deps should list
    for stage in STAGES:
        print(f"{stage}:\n" + "".join(f"  - {d}\n" for d in suggested_deps(stage)))
