"""Errors raised while loading a base model; each names the file and the problem."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A base model folder could not be loaded."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsupportedModelError(ModelLoadError):
    """The folder holds a model whose architecture or settings mixserve does not run."""
