"""kernels/_cpu_build.py: a source that cannot be built leaves the ops on their references with a
warning (never an exception in a step), and the switches turn the compiled kernels off."""

from __future__ import annotations

import logging

import pytest

from mixserve.kernels import _cpu_build, prepare_cpu_kernels
from mixserve.kernels.moe_lora_ffn import cpu


def test_a_source_that_does_not_compile_gives_none_and_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++;\n")
    with caplog.at_level(logging.WARNING, logger=_cpu_build.__name__):
        assert _cpu_build.build.__wrapped__((source,), ("f",)) is None
    assert "broken.cpp) not built" in caplog.text and "torch references run" in caplog.text


@pytest.mark.parametrize(("value", "on"), [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_switch(value, on, monkeypatch):
    monkeypatch.setenv(_cpu_build.ENV, value)
    assert _cpu_build.enabled() is on
    if not on:
        assert cpu.module() is None and _cpu_build.module() is None
        assert prepare_cpu_kernels() is False


def test_prepare_follows_the_kernel_choice(monkeypatch):
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
    assert prepare_cpu_kernels() is False
    monkeypatch.setenv("MIXSERVE_KERNELS", "auto")
    assert prepare_cpu_kernels() is (cpu.module() is not None)


def test_the_build_name_follows_source_flags_and_cpu(tmp_path, monkeypatch):
    """A changed source, flag set or CPU never reuses another's binary: each is in the name."""
    names = []
    monkeypatch.setattr(
        "torch.utils.cpp_extension.load_inline", lambda name, **kw: names.append(name)
    )
    source = tmp_path / "k.cpp"
    for text, flags in (("int a;", "x"), ("int b;", "x"), ("int b;", "y")):
        source.write_text(text)
        monkeypatch.setattr(_cpu_build, "_cpu_flags", lambda f=flags: f)
        _cpu_build.build.__wrapped__((source,), ("f",))  # uncached: the real builds stay cached
    assert len(set(names)) == 3 and all(n.startswith("mixserve_cpu_kernels_") for n in names)
