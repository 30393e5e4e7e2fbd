"""Reading `.bin` weight files: the fast unpickler reads plain state dicts exactly as torch's
weights-only unpickler does, hands everything else to it, and never runs a pickle's code."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

from mixserve.adapters import AdapterFileError, AdapterValueError
from mixserve.adapters.files import _read_plain_bin, read_weights


class _MakesAFolder:
    """Unpickling this calls os.makedirs: neither reader may ever do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (self.marker,)


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


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert got[key].stride() == tensor.stride(), key
        assert torch.equal(got[key], tensor), key


def test_fast_reader_matches_torch_weights_only_load(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save(_state_dict(), file)
    got = _read_plain_bin(file)
    assert got is not None, "a plain state dict must take the fast path"
    _assert_same(got, torch.load(file, weights_only=True))
    assert isinstance(got["param"], torch.nn.Parameter)
    # Views of one storage stay views of one storage, as torch.load gives them.
    assert got["view"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()


def test_read_weights_of_a_plain_file_is_the_fast_reads_result(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save(_state_dict(), file)
    _assert_same(read_weights("x", file), torch.load(file, weights_only=True))


def test_other_globals_go_to_torchs_weights_only_reader(tmp_path):
    # torch.Size is a global weights-only reading allows and the fast reader does not name.
    file = str(tmp_path / "w.bin")
    torch.save({"w": torch.ones(2), "size": torch.Size([2, 3])}, file)
    assert _read_plain_bin(file) is None
    # torch's reader reads it, and the check after it names the value that is no tensor.
    with pytest.raises(AdapterValueError, match="is a Size, not a tensor"):
        read_weights("x", file)


def test_legacy_format_is_left_to_the_weights_only_reader(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save(_state_dict(), file, _use_new_zipfile_serialization=False)
    assert _read_plain_bin(file) is None
    _assert_same(read_weights("x", file), torch.load(file, weights_only=True))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_calls_a_function_runs_nothing(tmp_path, legacy: bool):
    marker = str(tmp_path / "ran")
    file = str(tmp_path / "w.bin")
    torch.save(
        {"w": torch.ones(2), "evil": _MakesAFolder(marker)},
        file,
        _use_new_zipfile_serialization=not legacy,
    )
    assert _read_plain_bin(file) is None
    with pytest.raises(AdapterFileError, match="refused to unpickle"):
        read_weights("x", file)
    assert not os.path.exists(marker)
