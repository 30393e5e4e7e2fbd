"""Adapter reads in worker processes (mixserve.adapters.load_worker): the same weights and the
same typed errors as an in-process load_adapter, and a dead worker fails only its own load."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import signal
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest
import torch
from support.bad_adapters import edit_weights, good_adapter, save_raw
from support.load_workers import assert_same_weights
from support.pager_helpers import MakePager, settle, write

from mixserve.adapters import (
    AdapterError,
    AdapterFileError,
    AdapterValueError,
    MissingTensorError,
    load_adapter,
    load_worker,
)
from mixserve.adapters.errors import BaseModelMismatchError
from mixserve.adapters.load_worker import load_packed, unpack_weights
from mixserve.adapters.process_loader import ProcessLoader


class RefusedObject:
    """A pickled object that is no tensor (the worker's weights-only unpickler refuses it)."""


@pytest.fixture(scope="module")
def process_loader() -> Iterator[ProcessLoader]:
    loader = ProcessLoader(max_workers=1)
    loader.start()
    yield loader
    loader.close()


@pytest.mark.parametrize("strategy", ["mixlora", "dynmole", "mola", None])
def test_a_worker_process_loads_the_same_weights(tmp_path, arch, process_loader, strategy):
    path = write(tmp_path, "a", strategy, seed=3)
    assert_same_weights(process_loader("a", path, arch), load_adapter("a", path, arch))


@pytest.fixture
def room_to_map(monkeypatch):
    """Unpacked tensors stay mapped whatever the free space (a CI machine's /dev/shm may be
    Docker's 64 MiB; the copy-out below a threshold has its own test)."""
    monkeypatch.setattr(load_worker, "MIN_FREE_SHARED_BYTES", 0)


@pytest.mark.parametrize("strategy", ["mixlora", "mola", None])
@pytest.mark.parametrize("through", ["pipe", "exchange_file", "missing_folder", "full_folder"])
def test_pack_and_unpack_keep_every_tensor(
    tmp_path, arch, monkeypatch, through, strategy, room_to_map
):
    path = write(tmp_path, "a", strategy, seed=1)
    weights = load_adapter("a", path, arch)
    folder = {"pipe": None, "missing_folder": tmp_path / "gone"}.get(through, tmp_path / "x")
    if folder is not None and through != "missing_folder":
        folder.mkdir()
    if through == "full_folder":

        def no_room(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "no space left")

        monkeypatch.setattr(os, "posix_fallocate", no_room)
    file = None if folder is None else str(folder / "w.tensors")
    packed = pickle.loads(pickle.dumps(load_packed("a", path, arch, file)))
    if through == "full_folder":
        assert not os.path.exists(file), "a file that could not be allocated is left behind"
    # Without a folder that takes the file, the bytes travel in the pickle.
    assert (packed.exchange_file is not None) == (through == "exchange_file")
    assert bool(packed.tensors) == (through != "exchange_file")
    unpacked, mapping = unpack_weights(packed)
    assert (mapping is not None) == (through == "exchange_file")
    assert_same_weights(unpacked, weights)


def _mapped_files() -> str:
    with open("/proc/self/maps") as maps:
        return maps.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_the_mapping_lives_as_long_as_the_tensors_and_the_file_is_rewritten_in_place(
    tmp_path, arch, room_to_map
):
    big_path, small_path = (
        write(tmp_path, "big", "mixlora", seed=1),
        write(tmp_path, "small", None, seed=2),
    )
    big, small = load_adapter("big", big_path, arch), load_adapter("small", small_path, arch)
    file = str(tmp_path / "w.tensors")
    unpacked, mapping = unpack_weights(load_packed("big", big_path, arch, file))
    freed = weakref.ref(mapping)
    del mapping
    gc.collect()
    assert freed() is not None and file in _mapped_files(), "the tensors lost their memory"
    assert_same_weights(unpacked, big)
    del unpacked
    gc.collect()
    assert freed() is None and file not in _mapped_files(), "the file stays mapped"
    size = os.path.getsize(file)
    assert size >= big.nbytes
    # The next load writes in place: the file keeps its size (and so its pages).
    packed = load_packed("small", small_path, arch, file)
    assert os.path.getsize(file) == size, "the worker truncated the file: its pages are fresh"
    length = max(p.offset + p.nbytes for p in packed.file_tensors.values())
    assert 2 * length < size  # the setup: a spare file far bigger than the load
    small_unpacked, mapping = unpack_weights(packed)
    assert mapping is not None and len(mapping) == length
    assert_same_weights(small_unpacked, small)
    assert os.path.getsize(file) == length, "a spare's unused tail keeps its memory"
    assert_same_weights(unpack_weights(load_packed("big", big_path, arch, file))[0], big)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("room", ["plenty", "little", "unmeasurable"])
def test_unpacked_tensors_keep_their_file_mapped_only_with_room_to_spare(
    tmp_path, arch, monkeypatch, room
):
    # Mapped, a host-tier adapter holds its file's shared-memory pages: a 64 MiB /dev/shm
    # (Docker's default) would fill after two adapters.
    monkeypatch.setattr(load_worker, "MIN_FREE_SHARED_BYTES", 1 << 62 if room == "little" else 0)
    if room == "unmeasurable":

        def no_statvfs(path):
            raise OSError("statvfs failed")

        monkeypatch.setattr(load_worker.os, "statvfs", no_statvfs)
    path = write(tmp_path, "a", "mixlora", seed=1)
    weights = load_adapter("a", path, arch)
    file = str(tmp_path / "w.tensors")
    unpacked, mapping = unpack_weights(load_packed("a", path, arch, file))
    gc.collect()
    assert (mapping is not None) == (room == "plenty")
    assert (file in _mapped_files()) == (room == "plenty")
    assert_same_weights(unpacked, weights)  # copied out, the read tensors are not lost


def test_an_exchange_file_cut_short_fails_the_unpack(tmp_path, arch):
    file = str(tmp_path / "w.tensors")
    packed = load_packed("a", write(tmp_path, "a", "mixlora", seed=1), arch, file)
    os.truncate(file, os.path.getsize(file) // 2)
    with pytest.raises(OSError, match="holds .* bytes, its tensors"):
        unpack_weights(packed)


def test_loads_reuse_the_files_nothing_maps_and_close_removes_the_folder(
    tmp_path, arch, room_to_map
):
    loader = ProcessLoader(max_workers=1)
    folder = loader.exchange_dir
    assert folder is not None and os.path.isdir(folder)
    try:
        paths = [write(tmp_path, f"a{i}", "mixlora", seed=i) for i in range(3)]
        kept = loader("a0", paths[0], arch)  # its file stays mapped: the next load needs another
        assert_same_weights(kept, load_adapter("a0", paths[0], arch))
        assert len(os.listdir(folder)) == 1
        for i in (1, 2):  # each one's tensors dropped before the next: one more file, reused
            assert_same_weights(
                loader(f"a{i}", paths[i], arch), load_adapter(f"a{i}", paths[i], arch)
            )
            gc.collect()
            assert len(os.listdir(folder)) == 2
        del kept
        gc.collect()
        assert len(os.listdir(folder)) == 2, "a spare file was removed"
    finally:
        loader.close()
    assert not os.path.exists(folder)


def test_spare_files_past_the_byte_cap_are_removed(tmp_path, arch, room_to_map):
    path = good_adapter(tmp_path)
    one_file = ProcessLoader(max_workers=1)
    try:
        held = one_file("a", path, arch)
        (name,) = os.listdir(one_file.exchange_dir)
        size = os.path.getsize(os.path.join(one_file.exchange_dir, name))
    finally:
        one_file.close()
    loader = ProcessLoader(max_workers=1, max_spare_bytes=size)
    try:
        held = [loader("a", path, arch) for _ in range(3)]  # three files, all mapped
        assert len(os.listdir(loader.exchange_dir)) == 3
        del held
        gc.collect()
        assert len(os.listdir(loader.exchange_dir)) == 1, "spares past the byte cap are kept"
    finally:
        loader.close()


def test_an_unusable_exchange_folder_falls_back_to_the_pipe(tmp_path, arch):
    loader = ProcessLoader(max_workers=1)
    try:
        path = good_adapter(tmp_path)
        os.rmdir(loader.exchange_dir)
        os.mkfifo(loader.exchange_dir)  # not a folder: the worker falls back to the pipe
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
    finally:
        os.unlink(loader.exchange_dir)
        loader.close()


def test_errors_come_back_typed_with_the_same_message(tmp_path, arch, process_loader):
    key = "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"
    nan = good_adapter(tmp_path / "nan")
    edit_weights(nan, lambda w: w[key].view(-1).__setitem__(2, float("nan")))
    missing = good_adapter(tmp_path / "missing")
    edit_weights(missing, lambda w: w.pop(key))
    pickled = good_adapter(tmp_path / "pickled")
    save_raw(pickled, {"x": torch.zeros(1), "obj": RefusedObject()})
    for path, kind in ((nan, AdapterValueError), (missing, MissingTensorError)):
        with pytest.raises(kind) as in_process:
            load_adapter("bad", path, arch)
        with pytest.raises(kind) as in_worker:
            process_loader("bad", path, arch)
        assert str(in_worker.value) == str(in_process.value)
        assert (in_worker.value.file, in_worker.value.key) == (in_process.value.file, key)
    with pytest.raises(AdapterFileError, match="refused to unpickle"):
        process_loader("bad", pickled, arch)
    # The worker survives its adapters' errors.
    assert process_loader("ok", good_adapter(tmp_path / "ok"), arch).name == "ok"


@pytest.mark.parametrize(
    "error",
    [
        AdapterError("a", "problem"),
        MissingTensorError("a", "missing", file="/x/adapter_model.bin", key="k.weight"),
        BaseModelMismatchError("a", "hidden size", file="/x/adapter_model.bin"),
    ],
)
def test_adapter_errors_survive_pickling(error: AdapterError):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert (copy.adapter, copy.problem, copy.file, copy.key) == (
        error.adapter,
        error.problem,
        error.file,
        error.key,
    )


def test_a_dead_worker_fails_one_load_and_is_replaced(tmp_path, arch):
    loader = ProcessLoader(max_workers=1)
    try:
        path = good_adapter(tmp_path)
        assert loader("a", path, arch).name == "a"
        (worker,) = loader._workers
        worker.proc.kill()
        worker.proc.wait()
        with pytest.raises(AdapterError, match="load worker died"):
            loader("a", path, arch)
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
        assert loader._workers and loader._workers[0] is not worker
    finally:
        loader.close()


def test_close_stops_the_workers_and_refuses_new_loads(tmp_path, arch):
    loader = ProcessLoader(max_workers=2)
    loader.start()
    (worker,) = loader._workers
    loader.close()
    assert worker.proc.poll() is not None
    with pytest.raises(RuntimeError, match="closed"):
        loader("a", good_adapter(tmp_path), arch)


def test_the_pager_loads_through_worker_processes(make_pager: MakePager, tmp_path):
    pager = make_pager(loader=ProcessLoader(max_workers=2))
    for i, name in enumerate(("a", "b", "c")):
        pager.add_source(name, write(tmp_path, name, "mixlora", seed=i))
        pager.acquire(name)
    assert all(r.ok for r in settle(pager))
    assert pager.prepare(["a", "b"]).keys() == {"a", "b"}


def test_a_dropped_loader_ends_its_workers(tmp_path, arch):
    loader = ProcessLoader(max_workers=1)
    assert loader("a", good_adapter(tmp_path), arch).name == "a"
    (worker,) = loader._workers
    proc, folder = worker.proc, loader.exchange_dir
    del loader, worker
    gc.collect()
    assert proc.wait(timeout=30) == 0
    assert not os.path.exists(folder)


def test_workers_ignore_ctrl_c_sent_to_the_process_group(tmp_path, arch):
    loader = ProcessLoader(max_workers=1)
    try:
        path = good_adapter(tmp_path)
        assert loader("a", path, arch).name == "a"  # the worker is up and serving
        (worker,) = loader._workers
        os.kill(worker.proc.pid, signal.SIGINT)
        assert loader("a", path, arch).name == "a"
        assert loader._workers == [worker]
    finally:
        loader.close()


def test_wait_until_ready_waits_for_the_started_workers_imports(tmp_path, arch):
    loader = ProcessLoader(max_workers=1)
    try:
        loader.wait_until_ready()  # nothing started: returns at once
        assert loader._workers == []
        loader.start()
        loader.wait_until_ready()
        (worker,) = loader._workers
        assert worker._ready and worker.alive
        path = good_adapter(tmp_path)
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
        assert loader._workers == [worker]
    finally:
        loader.close()


def test_a_worker_that_dies_while_starting_is_dropped_and_replaced(tmp_path, arch, caplog):
    loader = ProcessLoader(max_workers=1)
    try:
        loader.start()
        (worker,) = loader._workers
        worker.proc.kill()
        worker.proc.wait()
        loader.wait_until_ready()
        assert "failed while starting" in caplog.text
        assert loader._workers == []
        path = good_adapter(tmp_path)
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
        assert loader._workers and loader._workers[0] is not worker
    finally:
        loader.close()


def test_a_worker_freezes_its_imports_out_of_the_collector():
    """The worker's main (here with an empty stdin: it settles, then stops at the EOF) freezes
    its startup objects out of the garbage collector. Run in a child: freezing this test
    process would keep its garbage."""
    script = (
        "import gc, sys\n"
        "from mixserve.adapters import load_worker\n"
        "assert gc.get_freeze_count() == 0\n"
        "load_worker.main()\n"
        "print(gc.get_freeze_count(), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=b"",
        capture_output=True,
        timeout=120,
        env={**os.environ, load_worker.KEEP_FREED_MEMORY_ENV: "1"},
    )
    assert done.returncode == 0, done.stderr
    assert pickle.loads(done.stdout) == load_worker.READY  # its one reply
    assert int(done.stderr.decode().split()[-1]) > 10_000  # torch's import makes ~100k
