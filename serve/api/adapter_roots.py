"""Adapter names resolved under the configured roots, and nowhere else.

A name is one path component (letters, digits, '.', '_', '-'; not '.' or '..'); its folder is
`<root>/<name>`, and the folder's real path (symlinks resolved) must stay inside that root.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from mixserve.api.errors import APIError, bad_request

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_CONFIG_NAMES = ("adapter_config.json", "mixlora_config.json")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, c)) for c in _CONFIG_NAMES)


class AdapterRoots:
    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [os.path.realpath(r) for r in roots]

    @staticmethod
    def check_name(name: str) -> None:
        if not _NAME.match(name) or name in (".", ".."):
            raise bad_request(
                f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' only",
                "model",
            )

    def resolve(self, name: str) -> str | None:
        """The adapter folder for a name, or None if no root has one."""
        self.check_name(name)
        for root in self.roots:
            candidate = os.path.join(root, name)
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if not _inside(real, root):
                raise APIError(
                    400,
                    f"adapter {name!r} resolves outside the adapter roots",
                    param="model",
                    code="adapter_outside_roots",
                )
            if _is_adapter_dir(real):
                return real
        return None

    def check_path(self, path: str) -> str:
        """A folder given explicitly (load endpoint): allowed only inside a root."""
        if not self.roots:
            raise APIError(
                403,
                "loading adapters by path needs --adapter-dir roots",
                type="permission_error",
                param="lora_path",
            )
        real = os.path.realpath(path)
        if not any(_inside(real, root) for root in self.roots):
            raise APIError(
                403,
                "lora_path is outside the adapter roots",
                type="permission_error",
                param="lora_path",
                code="adapter_outside_roots",
            )
        if not _is_adapter_dir(real):
            raise bad_request("lora_path holds no adapter_config.json", "lora_path")
        return real

    def discover(self) -> dict[str, str]:
        """Every adapter folder directly under a root (first root wins on a name clash)."""
        found: dict[str, str] = {}
        for root in self.roots:
            try:
                entries = sorted(os.listdir(root))
            except OSError:
                continue
            for name in entries:
                if name in found or not _NAME.match(name):
                    continue
                real = os.path.realpath(os.path.join(root, name))
                if _inside(real, root) and _is_adapter_dir(real):
                    found[name] = real
        return found
