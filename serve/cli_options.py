"""argparse options whose default comes from an environment variable (MIXSERVE_*), and the
value parsers they use (sizes with units, booleans)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_bytes(value: str) -> int:
    """'512MiB', '4GiB', '1.5GB', '1048576' -> bytes."""
    match = _SIZE.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 512MiB, 4GiB)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def add_option(
    group: Any,
    flag: str,
    env: str,
    *,
    type: Callable[[str], Any] = str,  # noqa: A002 - argparse's name
    default: Any = None,
    help: str,  # noqa: A002 - argparse's name
    append: bool = False,
) -> None:
    raw = os.environ.get(env)
    if append:  # env: paths separated by os.pathsep; flags add to them
        values = [type(p) for p in raw.split(os.pathsep) if p] if raw else []
        group.add_argument(
            flag, type=type, action="append", default=values, help=f"{help} [env {env}]"
        )
        return
    if raw is not None:
        default = type(raw)
    group.add_argument(flag, type=type, default=default, help=f"{help} [env {env}]")


def add_switch(group: Any, flag: str, env: str, help: str) -> None:  # noqa: A002
    default = parse_flag(os.environ.get(env, "0"))
    group.add_argument(flag, action="store_true", default=default, help=f"{help} [env {env}]")
