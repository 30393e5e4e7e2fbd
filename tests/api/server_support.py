"""Run `mixserve serve` as a real process on 127.0.0.1 for API tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        fd, self.log_path = tempfile.mkstemp(prefix=f"mixserve-test-{self.port}-", suffix=".log")
        self._log = os.fdopen(fd, "w")  # closed, read and removed in stop()
        self._final_log: str | None = None
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mixserve",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far (its last 6000 characters), also after stop()."""
        if self._final_log is not None:
            return self._final_log
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def terminate(self) -> None:
        self._terminated = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (once) and wait; the exit code (0 after a clean drain)."""
        if self.proc.poll() is None:
            if not getattr(self, "_terminated", False):
                self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_log is None:  # the first stop keeps the output and removes the file
            self._log.close()
            self._final_log = self.log()
            os.unlink(self.log_path)
        return self.proc.returncode


def tiny_server(
    files: dict[str, str], *extra: str, kv_cache: str = "32MiB", adapters: bool = True
) -> ServerProcess:
    """A server on the tiny test model (files: the api_files fixture), without demo adapters,
    with the test's adapter root unless adapters=False; `extra`: the test's own flags."""
    roots = ["--adapter-dir", files["adapters"]] if adapters else []
    return ServerProcess(
        ["--model", files["model"], *roots, "--no-demo-adapters", "--kv-cache-memory", kv_cache]
        + list(extra)
    )


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one Prometheus sample in /metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return 0.0
