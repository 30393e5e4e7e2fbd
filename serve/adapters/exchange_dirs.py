"""The load workers' exchange folders: one private folder per loader on shared memory, named
after its process and PID namespace so a later loader can remove the folder of a killed one.

Files on /dev/shm hold memory until a reboot: a process killed before its cleanup (a Ray replica,
SIGKILL) would otherwise leak every exchange file it had open.
"""

from __future__ import annotations

import os
import shutil
import tempfile

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
