"""The load workers' exchange folders: a killed loader's folder is removed by the next one, and
only where its process is known to be gone; the files in one are reused within a byte cap."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import torch

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


def test_host_copies_go_into_a_spare_file_and_give_it_back_when_freed(tmp_path):
    files = ExchangeFiles(str(tmp_path))
    spare = _written(files.take(), 4096)
    files.give_back(spare, reuse=True)
    base = torch.arange(48, dtype=torch.float32).view(4, 12)
    tensors = [base[:, ::2], torch.ones(3, dtype=torch.bfloat16), base.new_empty(0)]
    copies = files.host_copies(tensors)  # strided views, another dtype, an empty one
    assert files.spare_bytes == 0, "the spare was not taken"
    assert os.path.getsize(spare) < 4096, "a much longer spare keeps its unused tail"
    for copy, tensor in zip(copies, tensors, strict=True):
        assert torch.equal(copy, tensor) and copy.dtype == tensor.dtype
        assert copy.is_contiguous()
    base += 1  # copies, not views of the originals
    assert torch.equal(copies[0], (base - 1)[:, ::2])
    del copies
    gc.collect()
    # Back as a spare (cut to the copies' size: map_tensors trims a much longer spare's tail).
    assert files.spare_bytes == os.path.getsize(spare) > 0, "not back once nothing mapped it"


def test_host_copies_without_a_spare_or_a_folder_are_new_memory(tmp_path):
    tensor = torch.randn(5, 7)
    for files in (ExchangeFiles(str(tmp_path)), ExchangeFiles(None)):
        (copy,) = files.host_copies([tensor.T])
        assert torch.equal(copy, tensor.T) and copy.is_contiguous()
        assert files.spare_bytes == 0 and not os.listdir(tmp_path)


def test_a_spare_shorter_than_the_copies_is_extended(tmp_path):
    files = ExchangeFiles(str(tmp_path))
    spare = _written(files.take(), 8)
    files.give_back(spare, reuse=True)
    tensor = torch.randn(64, 64)
    (copy,) = files.host_copies([tensor])
    assert torch.equal(copy, tensor) and os.path.getsize(spare) >= tensor.nbytes
