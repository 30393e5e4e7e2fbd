"""The load workers' exchange folders: a killed loader's folder is removed by the next one, and
only where its process is known to be gone."""

from __future__ import annotations

import os
import subprocess
import sys

from mixserve.adapters.exchange_dirs import remove_stale_exchange_dirs


def test_folders_of_dead_processes_are_removed(tmp_path):
    """A loader killed before its cleanup leaves its folder; the next one removes it, and only
    folders whose process is gone, in this PID namespace (another namespace's PIDs cannot be
    checked from here: a container sharing /dev/shm)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    names = {
        "dead": f"mixserve-loads-{namespace}-{gone.pid}-abc",
        "self": f"mixserve-loads-{namespace}-{os.getpid()}-abc",
        "parent": f"mixserve-loads-{namespace}-{os.getppid()}-abc",
        "other": "mixserve-notes",
        "other_namespace": f"mixserve-loads-{namespace + 1}-{gone.pid}-abc",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.safetensors").write_bytes(b"x")
    remove_stale_exchange_dirs(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("self", "parent", "other", "other_namespace")
    )
