"""The package's layers: every import points down or sideways, inference never imports training.

    run/ (5) -> tune/, analysis/ (4) -> segmentation/, shape/ (3) -> discs/ (2) -> data/ (1)
    -> config, resources, progress, stats (0)
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pipeline": 0, "pipeline.data": 1, "pipeline.discs": 2, "pipeline.segmentation": 3,
          "pipeline.shape": 3, "pipeline.analysis": 4, "tune": 4, "pipeline.run": 5}
INFERENCE_NOT_TRAINING = {"pipeline.segmentation.stream": "pipeline.segmentation.train",
                          "pipeline.shape.encode": "pipeline.shape.train"}


def _package(module: str) -> str:
    """The layer a dotted module name lives in (its longest prefix in LAYERS)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS and (n < len(parts) or module in ("pipeline", "tune")):
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer")


def _modules() -> list[str]:
    files = [*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("tune").rglob("*.py")]
    return sorted(".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files)


def _imports(module: str) -> set[str]:
    """Every project module that `module` imports, at top level or inside a function."""
    tree = ast.parse(ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "tune") and (
                    ROOT.joinpath(*name.split(".")).with_suffix(".py").exists()):
                found.add(name)
    return found


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down_or_sideways(module):
    own = _package(module)
    for imported in _imports(module):
        target = _package(imported)
        assert LAYERS[target] < LAYERS[own] or target == own, (
            f"{module} (layer {own}) imports {imported} (layer {target})")
        assert INFERENCE_NOT_TRAINING.get(module) != imported, f"{module} imports {imported}"


def test_the_check_sees_imports_inside_functions_and_ranks_them():
    assert "tune.bottleneck_sweep" in _imports("pipeline.run.stages")  # imported inside a stage
    assert _package("pipeline.stats") == "pipeline"
    # the import this layout removed (validate took BadInput from preprocess) would fail
    assert LAYERS[_package("pipeline.segmentation.preprocess")] > LAYERS[
        _package("pipeline.data.validate")]


def test_the_workers_that_read_preprocess_and_measure_never_import_monai():
    """MONAI's __init__ imports all of MONAI (4-8 s of CPU per process): the modules whose
    functions Ray Data runs on CPU workers import it only where a network is built or run."""
    modules = ["pipeline.segmentation.preprocess", "pipeline.segmentation.stream",
               "pipeline.segmentation.models", "pipeline.shape.encode"]
    check = (f"import sys; import {', '.join(modules)}; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
