"""The fast `.bin` reader on files: plain state dicts read as torch's weights-only reader reads
them (as plain tensors: a Parameter's requires_grad is dropped); everything else is refused,
and the caller then asks torch. Hand-written pickles: test_bin_reader_pickles.py."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from support.adapter_files import BaseDims, write_adapter
from support.state_dicts import (
    FOUR_FLOATS,
    MakesAFolder,
    assert_same,
    mixed_state_dict,
    recompressed,
    tensor_dict_pickle,
    write_archive,
)

import mixserve.adapters.bin_reader as bin_reader
from mixserve.adapters.bin_reader import NotPlainStateDict, read_bin_state_dict


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
    assert_same(got, torch.load(file, weights_only=True))
    assert_same(got, want)


def test_an_adapter_file_reads_as_torch_reads_it(tmp_path):
    dims = BaseDims(hidden=16, intermediate=24, q=16, kv=8, num_layers=2)
    folder = write_adapter(str(tmp_path / "a"), dims, "mixlora", r=4, num_experts=3)
    file = os.path.join(folder, "adapter_model.bin")
    assert_same(read_bin_state_dict(file), torch.load(file, weights_only=True))


def test_writes_to_the_tensors_stay_in_this_process(tmp_path):
    file = str(tmp_path / "w.bin")
    torch.save({"w": torch.ones(4)}, file)
    read_bin_state_dict(file)["w"].fill_(7.0)
    assert torch.equal(read_bin_state_dict(file)["w"], torch.ones(4))
    assert torch.equal(torch.load(file, weights_only=True)["w"], torch.ones(4))


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


def test_a_compressed_record_is_refused(tmp_path):
    """Its bytes at the record's offset are not its values (torch's own mapped read takes them
    for values)."""
    file = str(tmp_path / "w.bin")
    torch.save({"w": torch.arange(1000.0)}, file)
    with pytest.raises(NotPlainStateDict, match="stored compressed"):
        read_bin_state_dict(recompressed(file, str(tmp_path / "deflated.bin")))


@pytest.mark.parametrize(
    ("data_pkl", "records", "reason"),
    [
        pytest.param(tensor_dict_pickle((5,), (1,)), FOUR_FLOATS, "past the end", id="size"),
        pytest.param(tensor_dict_pickle((2,), (4,)), FOUR_FLOATS, "past the end", id="stride"),
        pytest.param(tensor_dict_pickle((2,), (1,), 3), FOUR_FLOATS, "past the end", id="offset"),
        pytest.param(
            tensor_dict_pickle((4,), (1,), numel=8), FOUR_FLOATS, "does not hold", id="short record"
        ),  # fmt: skip
        pytest.param(tensor_dict_pickle((4,), (1,)), {}, "no record", id="missing record"),
        pytest.param(
            tensor_dict_pickle((2**32, 2**32), (0, 0)),
            FOUR_FLOATS,
            "overflow",
            id="too many elements to index",
        ),  # fmt: skip
    ],
)
def test_a_tensor_outside_its_record_is_refused(tmp_path, data_pkl, records, reason):
    file = write_archive(str(tmp_path / "w.bin"), data_pkl, records)
    with pytest.raises(NotPlainStateDict, match=reason):
        read_bin_state_dict(file)


class _MustNotUnpickle:
    def __init__(self, *args: object) -> None:
        raise AssertionError("unpickled a pickle already read")


def test_a_pickle_read_before_is_not_unpickled_again_and_views_each_files_values(
    tmp_path, monkeypatch
):
    first, second = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    torch.save({"w": torch.zeros(3, 2), "v": torch.zeros(4)}, first)
    second_values = {"w": torch.randn(3, 2), "v": torch.randn(4)}
    torch.save(second_values, second)
    bin_reader._tensor_records.cache_clear()
    assert_same(read_bin_state_dict(first), {"w": torch.zeros(3, 2), "v": torch.zeros(4)})
    monkeypatch.setattr(bin_reader, "_Unpickler", _MustNotUnpickle)
    assert_same(read_bin_state_dict(second), second_values)


def test_a_pickle_read_before_still_has_each_files_records_checked(tmp_path):
    data_pkl = tensor_dict_pickle((4,), (1,))
    bin_reader._tensor_records.cache_clear()
    good = write_archive(str(tmp_path / "good.bin"), data_pkl, FOUR_FLOATS)
    assert_same(read_bin_state_dict(good), {"w": torch.zeros(4)})
    short = write_archive(str(tmp_path / "short.bin"), data_pkl, {"data/0": bytes(8)})
    with pytest.raises(NotPlainStateDict, match="does not hold"):
        read_bin_state_dict(short)
    missing = write_archive(str(tmp_path / "missing.bin"), data_pkl, {})
    with pytest.raises(NotPlainStateDict, match="no record"):
        read_bin_state_dict(missing)
