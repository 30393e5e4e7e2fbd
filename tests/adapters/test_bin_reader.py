"""The fast `.bin` reader: plain state dicts read exactly as torch's weights-only reader reads
them; everything else is refused (the caller then asks torch), and no pickle can call, modify or
reach anything of the process while it is read."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from support.adapter_files import BaseDims, write_adapter
from support.state_dicts import MakesAFolder, mixed_state_dict

import mixserve.adapters.bin_reader as bin_reader
from mixserve.adapters.bin_reader import NotPlainStateDict, read_bin_state_dict


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert got[key].stride() == tensor.stride(), key
        assert torch.equal(got[key], tensor), key


def test_a_state_dict_reads_as_torch_reads_it(tmp_path):
    file = str(tmp_path / "w.bin")
    want = mixed_state_dict()
    want.update(
        f64=torch.randn(3, dtype=torch.float64),
        i64=torch.arange(5),
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        strided=torch.arange(20.0).view(4, 5)[::2, 1::2],
    )
    torch.save(want, file)
    got = read_bin_state_dict(file)
    assert type(got) is dict
    _assert_same(got, torch.load(file, weights_only=True))
    _assert_same(got, want)


def test_an_adapter_file_reads_as_torch_reads_it(tmp_path):
    dims = BaseDims(hidden=16, intermediate=24, q=16, kv=8, num_layers=2)
    folder = write_adapter(str(tmp_path / "a"), dims, "mixlora", r=4, num_experts=3)
    file = os.path.join(folder, "adapter_model.bin")
    _assert_same(read_bin_state_dict(file), torch.load(file, weights_only=True))


def test_tensors_are_private_copies_on_write(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save({"w": torch.ones(4)}, file)
    read_bin_state_dict(file)["w"].fill_(7.0)
    assert torch.equal(read_bin_state_dict(file)["w"], torch.ones(4))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"w": [torch.ones(1)]}, id="a list"),
        pytest.param({"w": {"x": torch.ones(1)}}, id="a nested dict"),
        pytest.param({"w": 3}, id="a number"),
        pytest.param(torch.ones(2), id="a bare tensor"),
        pytest.param({"w": OrderedDict(x=torch.ones(1))}, id="an OrderedDict of items"),
    ],
)
def test_anything_but_a_flat_dict_of_tensors_is_refused(tmp_path, value):
    file = str(tmp_path / "w.bin")
    torch.save(value, file)
    with pytest.raises(NotPlainStateDict):
        read_bin_state_dict(file)


def test_the_legacy_format_is_refused(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save({"w": torch.ones(2)}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(NotPlainStateDict, match="not a torch zip archive"):
        read_bin_state_dict(file)


def test_a_pickle_that_calls_a_function_is_refused_before_it_runs(tmp_path):
    file = str(tmp_path / "w.bin")
    marker = str(tmp_path / "made")
    torch.save({"w": MakesAFolder(marker)}, file)
    with pytest.raises(NotPlainStateDict, match="names os.makedirs"):
        read_bin_state_dict(file)
    assert not os.path.exists(marker)


def _archive(file: str, data_pkl: bytes, records: dict[str, bytes] | None = None) -> str:
    """A torch zip archive with a hand-written data.pkl."""
    writer = torch._C.PyTorchFileWriter(file)
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    for name, data in (records or {}).items():
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return file


REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
HOOKS = b"ccollections\nOrderedDict\n)R"  # OrderedDict()
FOUR_FLOATS = {"data/0": bytes(16)}


def _storage(numel: int = 4) -> bytes:
    """The persistent id ('storage', FloatStorage, '0', 'cpu', numel), loaded (BINPERSID)."""
    key_and_location = b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    storage_type = b"ctorch\nFloatStorage\n"
    numel_op = b"K" + bytes([numel])
    return b"(X\x07\x00\x00\x00storage" + storage_type + key_and_location + numel_op + b"tQ"


def _tensor_dict(size: int, stride: int, offset: int = 0, numel: int = 4) -> bytes:
    """{'w': _rebuild_tensor_v2(storage, offset, (size,), (stride,), False, OrderedDict())}."""
    args = _storage(numel) + b"K" + bytes([offset]) + b"K" + bytes([size]) + b"\x85K"
    args += bytes([stride]) + b"\x85\x89" + HOOKS
    return b"\x80\x02}X\x01\x00\x00\x00w" + REBUILD + b"(" + args + b"tRs."


def test_the_hand_written_archive_reads_when_plain(tmp_path):
    file = _archive(str(tmp_path / "w.bin"), _tensor_dict(4, 1), {"data/0": bytes(16)})
    _assert_same(read_bin_state_dict(file), {"w": torch.zeros(4)})
    _assert_same(read_bin_state_dict(file), torch.load(file, weights_only=True))


@pytest.mark.parametrize(
    ("data_pkl", "records", "reason"),
    [
        pytest.param(_tensor_dict(5, 1), FOUR_FLOATS, "past the end", id="size past storage"),
        pytest.param(_tensor_dict(2, 4), FOUR_FLOATS, "past the end", id="stride past storage"),
        pytest.param(_tensor_dict(2, 1, 3), FOUR_FLOATS, "past the end", id="offset past storage"),
        pytest.param(_tensor_dict(4, 1, numel=8), FOUR_FLOATS, "does not hold", id="short record"),
        pytest.param(_tensor_dict(4, 1), {}, "no record", id="missing record"),
    ],
)
def test_a_tensor_outside_its_record_is_refused(tmp_path, data_pkl, records, reason):
    file = _archive(str(tmp_path / "w.bin"), data_pkl, records)
    with pytest.raises(NotPlainStateDict, match=reason):
        read_bin_state_dict(file)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(b"}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xs", id="a __dict__ update"),
        pytest.param(b"N}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xs\x86", id="a slot state"),
    ],
)
@pytest.mark.parametrize("target", [REBUILD, REBUILD + b")R"], ids=["stand-in", "its result"])
def test_build_cannot_change_a_stand_in_or_its_result(tmp_path, state, target):
    """BUILD sets attributes on whatever is on the stack: the hole the first fast reader had
    (it let a pickle change torch's own _rebuild_tensor_v2 for the whole process)."""
    file = _archive(str(tmp_path / "w.bin"), b"\x80\x02" + target + state + b"b0}.")
    with pytest.raises(NotPlainStateDict):
        read_bin_state_dict(file)
    assert not hasattr(torch._utils._rebuild_tensor_v2, "name")
    plain = _archive(str(tmp_path / "plain.bin"), _tensor_dict(4, 1), {"data/0": bytes(16)})
    _assert_same(read_bin_state_dict(plain), {"w": torch.zeros(4)})


@pytest.mark.parametrize(
    "data_pkl",
    [
        pytest.param(b"\x80\x02cbuiltins\nexec\n.", id="an unknown global"),
        pytest.param(b"\x80\x02ctorch\nFloatStorage\n)R.", id="calling a storage type"),
        pytest.param(b"\x80\x02" + HOOKS + b"(K\x01tR.", id="an OrderedDict with items"),
        pytest.param(b"\x80\x02X\x01\x00\x00\x00xQ.", id="an odd persistent id"),
        pytest.param(b"\x80\x02" + REBUILD + b"K\x01a.", id="appending to a stand-in"),
        pytest.param(b"\x80\x02}X\x01\x00\x00\x00w" + REBUILD + b")Rs.", id="too few arguments"),
        pytest.param(b"\x80\x02(", id="a truncated pickle"),
    ],
)
def test_other_pickles_are_refused(tmp_path, data_pkl):
    file = _archive(str(tmp_path / "w.bin"), data_pkl)
    with pytest.raises(NotPlainStateDict):
        read_bin_state_dict(file)


def test_stand_ins_and_their_calls_are_immutable():
    stand_in = bin_reader._StandIn("torch._utils._rebuild_tensor_v2")
    call = stand_in(1, 2)
    for obj in (stand_in, call):
        assert not hasattr(obj, "__dict__")
        assert not hasattr(obj, "__setstate__")
        with pytest.raises(NotPlainStateDict):
            obj.name = "x"
        with pytest.raises(NotPlainStateDict):
            del obj.name
