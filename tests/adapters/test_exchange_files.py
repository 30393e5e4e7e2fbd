"""Exchange files: the soft limit on open files is raised where each mapping keeps its file open
(Python < 3.13); mmap.close() cannot pull the memory from under the tensors."""

from __future__ import annotations

import sys

import pytest
import torch

from mixserve.adapters.exchange_files import copy_into_file, raise_open_files_limit

resource = pytest.importorskip("resource")


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="mappings keep no descriptor there")
def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 64), hard))
    try:
        raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_mapping_with_live_tensors_cannot_be_closed(tmp_path):
    path = str(tmp_path / "w.tensors")
    want = {
        "a": torch.arange(6, dtype=torch.float32).view(2, 3),
        "b": torch.ones((), dtype=torch.bfloat16),
    }
    tensors, mapping = copy_into_file(want, path)
    assert mapping is not None
    with pytest.raises(BufferError):
        mapping.close()
    for key, tensor in want.items():
        assert torch.equal(tensors[key], tensor) and tensors[key].dtype == tensor.dtype
