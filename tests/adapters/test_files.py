"""Reading `.bin` weight files: tensors come back exactly as torch's weights-only reader gives
them, and no file can run code while it is read (a pickle's reduce, a TorchScript archive)."""

from __future__ import annotations

import os

import pytest
import torch
from support.state_dicts import MakesAFolder, mixed_state_dict, recompressed

from mixserve.adapters import AdapterFileError
from mixserve.adapters.bin_reader import NotPlainStateDict, read_bin_state_dict
from mixserve.adapters.files import read_weights


class _Scripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


@pytest.mark.parametrize("legacy", [False, True])
def test_tensors_come_back_as_saved(tmp_path, legacy: bool):
    file = str(tmp_path / "w.bin")
    want = mixed_state_dict()
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
        {"w": torch.ones(2), "evil": MakesAFolder(marker)},
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


def test_a_compressed_archive_reads_right(tmp_path, monkeypatch):
    """Its records are deflated: the fast reader refuses it and torch reads it unmapped."""
    file = str(tmp_path / "w.bin")
    want = mixed_state_dict()
    torch.save(want, file)
    deflated = recompressed(file, str(tmp_path / "deflated.bin"))
    with pytest.raises(NotPlainStateDict):
        read_bin_state_dict(deflated)
    torch_load = torch.load
    calls: list[dict] = []

    def recording_load(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    got = read_weights("x", deflated)
    assert len(calls) == 1 and not calls[0].get("mmap")
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
