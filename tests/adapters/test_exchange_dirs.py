"""The load workers' exchange folders: a killed loader's folder is removed by the next one, and
only where its process is known to be gone; the files in one are reused within a byte cap."""

from __future__ import annotations

import os
import subprocess
import sys

from mixserve.adapters.exchange_dirs import ExchangeFiles, remove_stale_exchange_dirs


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


def _written(path: str | None, size: int) -> str:
    assert path is not None
    with open(path, "wb") as file:
        file.write(b"x" * size)
    return path


def test_files_given_back_are_reused_within_the_byte_cap(tmp_path):
    files = ExchangeFiles(str(tmp_path), max_spare_bytes=250)
    first, second, third = (_written(files.take(), 100) for _ in range(3))
    assert len({first, second, third}) == 3, "a running load's file was handed out twice"
    for path in (first, second, third):
        files.give_back(path, reuse=True)
    assert files.spare_bytes == 200 and not os.path.exists(third), "kept past the cap"
    assert {files.take(), files.take()} == {first, second}
    assert files.take() not in (first, second, third)  # no spare left: a new name


def test_files_not_to_reuse_and_files_after_close_are_removed(tmp_path):
    files = ExchangeFiles(str(tmp_path))
    killed = _written(files.take(), 10)  # a killed worker may still have been writing it
    files.give_back(killed, reuse=False)
    assert not os.path.exists(killed)
    files.give_back(str(tmp_path / "never-written"), reuse=True)  # nothing to keep or remove
    assert files.spare_bytes == 0
    late = _written(files.take(), 10)
    files.close()
    files.give_back(late, reuse=True)
    assert not os.path.exists(late) and files.spare_bytes == 0


def test_without_a_folder_every_load_takes_the_pipe():
    assert ExchangeFiles(None).take() is None


def test_spares_take_at_most_a_quarter_of_the_filesystem(tmp_path):
    stats = os.statvfs(tmp_path)
    files = ExchangeFiles(str(tmp_path), max_spare_bytes=1 << 62)
    assert files.max_spare_bytes == stats.f_blocks * stats.f_frsize // 4
