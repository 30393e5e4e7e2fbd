"""The load workers' exchange folders: one private folder per loader on shared memory, named
after its process and PID namespace so a later loader can remove the folder of a killed one;
and the files in one (`ExchangeFiles`), kept for later loads once nothing maps them.

Files on /dev/shm hold memory until a reboot: a process killed before its cleanup (a Ray replica,
SIGKILL) would otherwise leak every exchange file it had open.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
import weakref

import torch

from mixserve.adapters.exchange_files import copy_into_file, fresh_copies

_EXCHANGE_PREFIX = "mixserve-loads-"


def _pid_namespace() -> int | None:
    """This process's PID namespace (the inode of /proc/self/ns/pid), or None where unknown: a
    PID means something only inside its namespace, and containers sharing /dev/shm (Docker's
    --ipc=host) see each other's folders but not each other's processes."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def make_exchange_dir(root: str | None = None) -> str | None:
    """A private folder for the workers' tensor files, on shared memory where there is one,
    named after this process and its PID namespace so a later loader in the same namespace can
    remove it if the process is killed."""
    if root is None:
        shm = "/dev/shm"
        root = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    remove_stale_exchange_dirs(root)
    namespace = _pid_namespace()
    owner = f"{namespace}-{os.getpid()}-" if namespace is not None else "x-"
    try:
        return tempfile.mkdtemp(prefix=f"{_EXCHANGE_PREFIX}{owner}", dir=root)
    except OSError:
        return None  # the pipe carries every load


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def remove_stale_exchange_dirs(root: str) -> None:
    """Remove the exchange folders of loaders whose process is gone: one killed (a Ray replica,
    SIGKILL) never ran its cleanup, and files on /dev/shm hold memory until a reboot. Only
    folders of this PID namespace are judged: another namespace's PIDs cannot be checked from
    here, and its folder may be in use."""
    namespace = _pid_namespace()
    if namespace is None:
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    mine = f"{_EXCHANGE_PREFIX}{namespace}-"
    for entry in entries:
        pid_text = entry.name.removeprefix(mine).split("-", 1)[0]
        if entry.name.startswith(mine) and pid_text.isdigit():
            pid = int(pid_text)
            if pid != os.getpid() and not _process_exists(pid):
                shutil.rmtree(entry.path, ignore_errors=True)


# What spare exchange files may hold at most (a loader may be given less: the builder caps it
# at the host tier's budget). They keep their memory until the loader closes (what that saves:
# exchange_files.py); 1 GiB is ~36 MixLoRA adapters of 28 MB, about the loads that finish
# during one long prefill step on 2 vCPUs, before the next step boundary frees their files.
DEFAULT_MAX_SPARE_BYTES = 1 << 30


def _filesystem_bytes(folder: str | None) -> int:
    if folder is None:
        return 0
    try:
        stats = os.statvfs(folder)
    except OSError:
        return 0
    return stats.f_blocks * stats.f_frsize


class ExchangeFiles:
    """The exchange files of one loader's folder: a file per running load, and the files that
    nothing maps any more, kept for later loads (reused, never truncated, so a load writes
    into pages that exist: exchange_files.py) up to max_spare_bytes. Removing the folder
    removes them all (the loader's close). The files of the host tier's adapters and the spares
    stay named in the folder while the loader lives: an engine killed without its cleanup
    leaves them until the next loader of its PID namespace removes its folder."""

    def __init__(self, folder: str | None, max_spare_bytes: int = DEFAULT_MAX_SPARE_BYTES) -> None:
        self.folder = folder  # None: no folder, every load takes the pipe
        # At most a quarter of the folder's filesystem (Docker's /dev/shm is 64 MiB).
        self.max_spare_bytes = min(max_spare_bytes, _filesystem_bytes(folder) // 4)
        self._spare: dict[str, int] = {}  # path -> size
        # Reentrant: a file comes back in a finalizer, which may run inside a garbage
        # collection on the thread that holds the lock.
        self._lock = threading.RLock()
        self._closed = False

    @property
    def spare_bytes(self) -> int:
        with self._lock:
            return sum(self._spare.values())

    def _take_spare(self) -> str | None:
        with self._lock:
            return self._spare.popitem()[0] if self._spare else None

    def take(self) -> str | None:
        """A spare file, else a new name in the folder (None: no folder)."""
        if self.folder is None:
            return None
        spare = self._take_spare()
        return spare or os.path.join(self.folder, f"{uuid.uuid4().hex}.tensors")

    def host_copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of tensors for the host tier (the pager's read-backs out of slots): in a
        spare file where there is one, whose pages exist, mapped until the copies are freed
        and then kept again; else in new memory. In a cold serving run on 2 vCPUs (a VM whose
        fresh pages fault in slowly: exchange_files.py) a 28 MB read-back into new memory
        took 38 ms on the engine thread (bench/RESULTS.md, session 28)."""
        path = self._take_spare()
        if path is None:
            return fresh_copies(tensors)
        try:
            mapped, mapping = copy_into_file({str(i): t for i, t in enumerate(tensors)}, path)
        except OSError:  # the file is gone or there is no room to extend it
            self.give_back(path, reuse=False)
            return fresh_copies(tensors)
        if mapping is None:  # no bytes at all
            self.give_back(path, reuse=True)
        else:
            weakref.finalize(mapping, self.give_back, path, reuse=True)
        return [mapped[str(i)] for i in range(len(tensors))]

    def give_back(self, path: str | None, *, reuse: bool) -> None:
        """Once nothing maps a load's file: keep it for a later load within max_spare_bytes,
        else remove it (also a file of a killed worker, and any after close). Any thread."""
        if path is None:
            return
        try:
            size = os.path.getsize(path)
        except OSError:  # never written, or the worker removed it: nothing to keep
            return
        with self._lock:
            fits = sum(self._spare.values()) + size <= self.max_spare_bytes
            if reuse and fits and not self._closed:
                self._spare[path] = size
                return
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        """Files given back from now on are removed (the loader removes its folder)."""
        with self._lock:
            self._closed = True
