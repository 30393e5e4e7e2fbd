"""What the deploy/ tests share: paths, validator binaries, manifests and the server's settings."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version, major_minor

from mixserve.cli_serve import add_serve_arguments

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests promise to work on (while kubernetes-validate bundles it),
# and the newest it bundles.
_BUNDLED = {major_minor(v) for v in all_versions()}
K8S_VERSIONS = tuple(v for v in ("1.29", major_minor(latest_version())) if v in _BUNDLED)
# Variables read outside cli_serve: the log level (cli.py), the cache folder and kernel choices.
EXTRA_SETTINGS = {
    "MIXSERVE_LOG_LEVEL",
    "MIXSERVE_CACHE",
    "MIXSERVE_KERNELS",
    "MIXSERVE_CPU_KERNELS",
}


def tool(name: str) -> str:
    """A validator's executable: the one pip put next to this interpreter, else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> dict[str, dict]:
    """kind -> object over deploy/k8s/*.yaml (one object per kind, except PVCs)."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            key = doc["kind"] if doc["kind"] != "PersistentVolumeClaim" else doc["metadata"]["name"]
            out[key] = doc
    return out


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def server_settings() -> set[str]:
    parser = serve_parser()
    helps = " ".join(action.help or "" for action in parser._actions)
    found = set(re.findall(r"\[env (MIXSERVE_\w+)\]", helps))
    assert len(found) > 20, "cli_serve's help no longer names its environment variables"
    return found | EXTRA_SETTINGS


def configmap_data() -> dict[str, str]:
    return k8s_objects()["ConfigMap"]["data"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out
