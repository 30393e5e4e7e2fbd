"""Reading `.bin` weight files: tensors come back exactly as torch's weights-only reader gives
them, and no file can run code while it is read (a pickle's reduce, a TorchScript archive)."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

from mixserve.adapters import AdapterFileError
from mixserve.adapters.files import read_weights


class _MakesAFolder:
    """Unpickling this calls os.makedirs: reading it must never do that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (self.marker,)


class _Scripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g)
    return OrderedDict(
        w32=torch.randn(3, 5, generator=g),
        w16=torch.randn(2, 3, generator=g).half(),
        wbf16=torch.randn(4, generator=g).bfloat16(),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g), requires_grad=False),
        view=shared[1:4],  # a view at an offset into another tensor's storage
        transposed=shared.t(),  # strides of a transposed view
        whole=shared,
        empty=torch.zeros(0, 3),
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_tensors_come_back_as_saved(tmp_path, legacy: bool):
    file = str(tmp_path / "w.bin")
    want = _state_dict()
    torch.save(want, file, _use_new_zipfile_serialization=not legacy)
    got = read_weights("x", file)
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_calls_a_function_runs_nothing(tmp_path, legacy: bool):
    marker = str(tmp_path / "ran")
    file = str(tmp_path / "w.bin")
    torch.save(
        {"w": torch.ones(2), "evil": _MakesAFolder(marker)},
        file,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(AdapterFileError, match="refused to unpickle"):
        read_weights("x", file)
    assert not os.path.exists(marker)


def test_a_torchscript_archive_is_refused_without_loading_it(tmp_path, monkeypatch):
    # torch.load without weights_only hands such archives to torch.jit.load, which runs their
    # code: a reader that ever did so would call it here.
    file = str(tmp_path / "w.bin")
    torch.jit.save(torch.jit.script(_Scripted()), file)
    calls: list[object] = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        read_weights("x", file)
    assert calls == []
