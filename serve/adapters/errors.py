"""Typed adapter errors. Each names the adapter, and where known the file and the tensor key.

Nothing here is ever silently repaired: a missing tensor is an error, never a random init.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class: an adapter could not be loaded or served."""

    def __init__(
        self, adapter: str, problem: str, *, file: str | None = None, key: str | None = None
    ) -> None:
        where = "".join(
            part for part in (f" {file}:" if file else "", f" key '{key}':" if key else "")
        )
        super().__init__(f"adapter '{adapter}':{where} {problem}")
        self.adapter = adapter
        self.file = file
        self.key = key
        self.problem = problem

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled by keyword (adapter loads in worker processes raise these): the default
        # reduce would call __init__ with the formatted message as its only argument.
        return (_rebuild, (type(self), self.adapter, self.problem, self.file, self.key))


def _rebuild(
    cls: type[AdapterError], adapter: str, problem: str, file: str | None, key: str | None
) -> AdapterError:
    return cls(adapter, problem, file=file, key=key)


class AdapterNotFoundError(AdapterError):
    """The adapter folder, its config or its weights file does not exist."""


class AdapterConfigError(AdapterError):
    """adapter_config.json is unreadable or holds invalid settings."""


class UnknownRoutingStrategyError(AdapterConfigError):
    """routing_strategy (or peft_type) names no family mixserve knows."""


class UnsupportedAdapterError(AdapterError):
    """A valid adapter of a kind mixserve does not serve (e.g. a PEFT DoRA magnitude vector)."""


class AdapterFileError(AdapterError):
    """The weights file is truncated, corrupt or not a plain dict of tensors."""


class MissingTensorError(AdapterError):
    """A tensor that the config implies is absent."""


class UnexpectedTensorError(AdapterError):
    """The file holds a tensor that the config does not explain."""


class AdapterShapeError(AdapterError):
    """A tensor has the wrong shape for the adapter's own settings (rank, experts)."""


class BaseModelMismatchError(AdapterShapeError):
    """The adapter was trained for a base model of other sizes (hidden size, layers, ...)."""


class AdapterValueError(AdapterError):
    """A tensor holds NaN/Inf, has a non-float dtype, or a value is not a tensor at all."""


class AdapterCapacityError(AdapterError):
    """The adapter is larger than the slot pool was sized for (rank, experts)."""
