"""The fast `.bin` reader against hand-written pickles: its opcode scan refuses everything a
protocol-2 state dict does not use before anything is unpickled, and behind it the unpickler
reaches nothing of the process (every global a stand-in that BUILD cannot change)."""

from __future__ import annotations

import io
import pickle
import tracemalloc
import zipfile

import pytest
import torch
from support.state_dicts import (
    FOUR_FLOATS,
    HOOKS,
    REBUILD,
    assert_same,
    tensor_dict_pickle,
    write_archive,
)

import mixserve.adapters.bin_reader as bin_reader
from mixserve.adapters.bin_reader import NotPlainStateDict, read_bin_state_dict


def test_the_hand_written_archive_reads_when_plain(tmp_path):
    file = write_archive(str(tmp_path / "w.bin"), tensor_dict_pickle((4,), (1,)), FOUR_FLOATS)
    assert_same(read_bin_state_dict(file), {"w": torch.zeros(4)})
    assert_same(read_bin_state_dict(file), torch.load(file, weights_only=True))


class _MustNotUnpickle(pickle.Unpickler):
    def __init__(self, *args: object) -> None:
        raise AssertionError("unpickled a pickle the scan should have refused")


@pytest.mark.parametrize(
    ("data_pkl", "reason"),
    [
        pytest.param(b"\x80\x02}r\x00\x00\x00\x080.", "opcode b'r'", id="memo index 2**27"),
        pytest.param(b"\x80\x02}p99999999\n0.", "opcode b'p'", id="text memo index"),
        pytest.param(b"\x80\x02\x82\xf1.", "opcode b'\\\\x82'", id="an extension code"),
        pytest.param(b"\x80\x02" + REBUILD + b"}b0}.", "opcode b'b'", id="BUILD"),
        pytest.param(b"\x80\x02" + REBUILD + b")\x81.", "opcode b'\\\\x81'", id="NEWOBJ"),
        pytest.param(b"\x80\x02" + REBUILD + b"K\x01a.", "opcode b'a'", id="APPEND"),
        pytest.param(
            b"\x80\x04\x95\x01\x00\x00\x00\x00\x00\x00\x00}.", "protocol-2", id="protocol 4"
        ),  # fmt: skip
        pytest.param(b"\x80\x02}", "without STOP", id="no STOP"),
        pytest.param(b"\x80\x02}.0", "opcode b'.'", id="STOP before the end"),
        pytest.param(b"\x80\x02X\xff\xff\xff\x00}.", "without STOP", id="a string past the end"),
        pytest.param(b"\x80\x02cos\nsystem", "unusual form", id="a global past the end"),
    ],
)
def test_other_opcodes_are_refused_before_unpickling(tmp_path, monkeypatch, data_pkl, reason):
    monkeypatch.setattr(bin_reader, "_Unpickler", _MustNotUnpickle)
    file = write_archive(str(tmp_path / "w.bin"), data_pkl)
    with pytest.raises(NotPlainStateDict, match=reason):
        read_bin_state_dict(file)


def test_memo_indices_below_the_bound_pass_the_scan():
    bin_reader._check_opcodes(b"\x80\x02}r\xff\xff\x0f\x00.")  # 2**20 - 1


def test_long_runs_scan_in_little_memory_and_still_end_at_a_refused_opcode():
    """`re` keeps a backtracking entry per repeat of an unbounded group: 1 MB of MARKs took
    ~120 MB to scan that way."""
    marks = b"\x80\x02" + b"(" * 1_000_000
    tracemalloc.start()
    try:
        bin_reader._check_opcodes(marks + b".")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    with pytest.raises(NotPlainStateDict, match="opcode b'b' at byte 1000002"):
        bin_reader._check_opcodes(marks + b"b.")


def test_names_differing_only_in_case_are_refused(tmp_path):
    """torch's reader (miniz) looks names up without case: it would read the deflated DATA/0
    where the zip module's directory gives the stored data/0."""
    file = str(tmp_path / "w.bin")
    with zipfile.ZipFile(file, "w") as archive:
        archive.writestr("archive/data.pkl", tensor_dict_pickle((4,), (1,)))
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/DATA/0", bytes(range(16)), zipfile.ZIP_DEFLATED)
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(NotPlainStateDict, match="but for case"):
        read_bin_state_dict(file)


def _zip_archive(file: str, records: dict[str, bytes]) -> str:
    """A zip of stored records with no alignment (the zip module's writer), data.pkl first."""
    with zipfile.ZipFile(file, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"archive/{name}", data)
    return file


def test_a_record_not_aligned_to_its_dtype_reads_at_its_own_offset(tmp_path):
    values = torch.arange(4.0)
    pickle_bytes = tensor_dict_pickle((4,), (1,))
    for pad in range(4):  # a record before data/0 that moves its bytes off a 4-byte boundary
        file = _zip_archive(
            str(tmp_path / f"w{pad}.bin"),
            {"data.pkl": pickle_bytes, "pad": bytes(pad), "data/0": values.numpy().tobytes()},
        )
        with zipfile.ZipFile(file) as archive:
            info = archive.getinfo("archive/data/0")
        if (info.header_offset + 30 + len(info.filename)) % 4:
            break
    else:
        pytest.fail("no padding put the record off a 4-byte boundary")
    assert_same(read_bin_state_dict(file), {"w": values})


def test_a_local_header_that_is_not_one_is_refused(tmp_path):
    file = _zip_archive(
        str(tmp_path / "w.bin"), {"data.pkl": tensor_dict_pickle((4,), (1,)), "data/0": bytes(16)}
    )
    with zipfile.ZipFile(file) as archive:
        offset = archive.getinfo("archive/data/0").header_offset
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(b"PK\x09\x09")
    with pytest.raises(NotPlainStateDict, match="no local header"):
        read_bin_state_dict(file)


@pytest.mark.parametrize(
    "data_pkl",
    [
        pytest.param(b"\x80\x02cbuiltins\nexec\n.", id="an unknown global"),
        pytest.param(b"\x80\x02ctorch\nFloatStorage\n)R.", id="calling a storage type"),
        pytest.param(b"\x80\x02" + HOOKS + b"(K\x01tR.", id="an OrderedDict with items"),
        pytest.param(b"\x80\x02X\x01\x00\x00\x00xQ.", id="an odd persistent id"),
        pytest.param(b"\x80\x02}X\x01\x00\x00\x00w" + REBUILD + b")Rs.", id="too few arguments"),
        pytest.param(b"\x80\x02(.", id="a pickle that ends in a MARK"),
    ],
)
def test_pickles_of_allowed_opcodes_but_other_calls_are_refused(tmp_path, data_pkl):
    file = write_archive(str(tmp_path / "w.bin"), data_pkl)
    with pytest.raises(NotPlainStateDict):
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
    """Behind the scan (which refuses BUILD): BUILD sets attributes on whatever is on the
    stack, the hole the first fast reader had (a pickle changed torch's own
    _rebuild_tensor_v2 for the whole process)."""
    data_pkl = b"\x80\x02" + target + state + b"b0}."
    with pytest.raises((NotPlainStateDict, AttributeError)):
        bin_reader._Unpickler(io.BytesIO(data_pkl)).load()
    assert not hasattr(torch._utils._rebuild_tensor_v2, "name")
    assert bin_reader._StandIn("x").name == "x"


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
