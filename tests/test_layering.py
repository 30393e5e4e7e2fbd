"""The one-way import rules of docs/ARCHITECTURE.md, checked by walking every import."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"mixserve": ROOT / "serve", "mixserve.kernels": ROOT / "kernels"}

# module prefix -> mixserve modules it must never import
FORBIDDEN = {
    "mixserve.kernels": ["mixserve"],  # kernels import torch/triton only
    "mixserve.model": [
        "mixserve.adapters",
        "mixserve.runner",
        "mixserve.llm",
        "mixserve.cli",
        "mixserve.offline_loop",
    ],
    "mixserve.adapters": [
        "mixserve.runner",
        "mixserve.llm",
        "mixserve.cli",
        "mixserve.offline_loop",
    ],
    "mixserve.runner": ["mixserve.llm", "mixserve.cli", "mixserve.offline_loop"],
    "mixserve.types": ["mixserve.model", "mixserve.adapters", "mixserve.runner"],
    # The API handles HTTP and text; tensors, batches and kernels stay behind the engine.
    "mixserve.api": [
        "torch",
        "mixserve.model",
        "mixserve.runner",
        "mixserve.kernels",
        "mixserve.scheduler",
    ],
    "mixserve.scheduler": [
        "torch",
        "mixserve.model",
        "mixserve.runner",
        "mixserve.adapters",
        "mixserve.engine",
    ],
    "mixserve.metrics": ["torch", "mixserve.model", "mixserve.runner", "mixserve.kernels"],
}
# model and kernels must never reach for metrics (checked both ways).
FORBIDDEN["mixserve.model"].append("mixserve.metrics")
ALLOWED_FOR_KERNELS = ("mixserve.kernels",)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "mixserve" and parts[:1] == ["kernels"]:
                continue
            found[name] = path
    return found


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_modules_are_found():
    modules = _modules()
    assert "mixserve.kernels.lora.reference" in modules and "mixserve.model.decoder" in modules


def test_import_rules():
    violations = []
    for module, path in _modules().items():
        for prefix, banned in FORBIDDEN.items():
            if module != prefix and not module.startswith(prefix + "."):
                continue
            for imported in _imports(path):
                for ban in banned:
                    hit = imported == ban or imported.startswith(ban + ".")
                    if prefix == "mixserve.kernels" and imported.startswith(ALLOWED_FOR_KERNELS):
                        hit = False
                    if hit:
                        violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_scheduler_and_api_types_do_not_load_torch():
    """The scheduler is pure Python: importing it (and its contracts) must not import torch."""
    import subprocess
    import sys

    code = (
        "import sys; import mixserve.scheduler, mixserve.types, mixserve.config; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
