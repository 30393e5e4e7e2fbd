"""Keep a source checkout's `kernels/` folder from shadowing the PyPI package `kernels`.

The repository keeps the kernels in a top-level folder `kernels/`, installed as `mixserve.kernels`.
A Python started in the repository root (`python -m ...`, `python -c ...`, a notebook, Ray
workers, which put the driver's working directory on their path) finds that folder first under
the plain name `kernels`, and transformers, which imports the PyPI package `kernels`, then fails
with an ImportError. Installed copies (wheels, the Docker image) have no such folder.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def unshadow_pypi_kernels() -> None:
    """Drop the source root from sys.path when its `kernels/` folder is ours (an editable
    install run from the checkout). Must run before anything imports transformers."""
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(source_root, "kernels", "__init__.py")):
        return  # an installed copy: nothing to shadow
    kept = [p for p in sys.path if os.path.abspath(p or os.curdir) != source_root]
    if len(kept) == len(sys.path):
        return
    sys.path[:] = kept
    logger.debug("removed the source root %s from sys.path (it shadows 'kernels')", source_root)
