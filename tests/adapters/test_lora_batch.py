"""build_lora_batch shares one plain Segments among sites with the same rows; the model's joint
q/k/v and gate/up calls (add_site_deltas) equal the site calls, jointly or per site."""

from __future__ import annotations

import pytest
import torch
from support.pool_helpers import FULL, load_tiny

from mixserve.adapters import AdapterPool
from mixserve.adapters.batch import build_lora_batch
from mixserve.kernels import joint_lora_a
from mixserve.model import lora as model_lora

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _pool(tmp_path, arch, dtype: torch.dtype) -> AdapterPool:
    """Slot 0: plain LoRA on every site; slot 1: plain LoRA on q and up; slot 2: MoLA (routed
    experts) on k."""
    pool = AdapterPool(arch, FULL, 3, dtype, "cpu")
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    pool.load(0, load_tiny(tmp_path, arch, None, "all", targets=every, r=8))
    pool.load(1, load_tiny(tmp_path, arch, None, "q", targets=("q_proj", "up_proj"), r=16))
    pool.load(2, load_tiny(tmp_path, arch, "mola", "mola", targets=("k_proj",)))
    return pool


@pytest.fixture
def pool(tmp_path, arch) -> AdapterPool:
    return _pool(tmp_path, arch, torch.float32)


def test_pool_keeps_qkv_and_gate_up_a_in_one_storage(pool):
    sites = pool.stacks.sites
    assert set(pool.stacks.joint_lora_a) == {QKV, GATE_UP}
    for group, joint in pool.stacks.joint_lora_a.items():
        for layer in range(joint.shape[0]):
            view = joint_lora_a(*(sites[p].lora_a[layer] for p in group))
            assert view is not None and view.data_ptr() == joint[layer].data_ptr()
            assert view.stride() == joint[layer].stride() and torch.equal(view, joint[layer])
    # Same shapes, separate storages: no joint view.
    assert joint_lora_a(sites["q_proj"].lora_a[0], sites["k_proj"].lora_a[0].clone()) is None


def test_qkv_a_stay_separate_off_cpu(arch):
    """The Triton path shrinks each site on its own: only gate/up share a storage there."""
    pool = AdapterPool(arch, FULL, 1, torch.float32, "meta")
    assert set(pool.stacks.joint_lora_a) == {GATE_UP}


def test_sites_with_the_same_plain_rows_share_one_segments(pool):
    batch = build_lora_batch(pool, torch.tensor([0, 0, -1, 1, 0]))
    assert batch is not None
    sites = batch.sites
    assert sites["k_proj"].plain is sites["v_proj"].plain is sites["o_proj"].plain
    assert sites["q_proj"].plain is not sites["k_proj"].plain  # q also has slot 1's row
    assert sites["q_proj"].plain.row_ids.tolist() == [0, 1, 4, 3]
    assert sites["k_proj"].plain.row_ids.tolist() == [0, 1, 4]


def _deltas(pool, sites, token_slots, x, joint_calls):
    batch = build_lora_batch(pool, torch.tensor(token_slots))
    assert batch is not None
    widths = [pool.stacks.sites[p].lora_b.shape[-2] for p in sites]
    base = torch.randn(x.shape[0], sum(widths), generator=torch.Generator().manual_seed(1))
    base = base.to(x.dtype)
    separate, joint = base.clone(), base.clone()
    col = 0
    for proj, width in zip(sites, widths, strict=True):
        model_lora.add_site_delta(batch, proj, 1, x, separate[:, col : col + width])
        col += width
    before = len(joint_calls)
    model_lora.add_site_deltas(batch, sites, 1, x, joint)
    return base, separate, joint, len(joint_calls) > before


@pytest.mark.parametrize(
    ("sites", "token_slots", "takes_joint"),
    [
        (QKV, [0, 0, -1, 0, 0, 0], True),  # every q/k/v row the same: one call
        (QKV, [0, 0, -1, 1, 0, 0], False),  # q has a row k and v do not
        (QKV, [0, 2, 0, 0, 2, -1], False),  # k has routed rows
        (GATE_UP, [0, 2, 0, -1, 2, 0], True),  # slot 2 has no MLP sites
        (GATE_UP, [0, 1, 0, 0], False),  # up has a row gate does not
    ],
)
def test_joint_sites_equal_the_site_calls(pool, arch, monkeypatch, sites, token_slots, takes_joint):
    joint_calls: list[int] = []
    real = model_lora.lora_apply_joint
    monkeypatch.setattr(
        model_lora, "lora_apply_joint", lambda *a, **k: joint_calls.append(1) or real(*a, **k)
    )
    x = torch.randn(len(token_slots), arch.hidden_size, generator=torch.Generator().manual_seed(0))
    base, separate, joint, took_joint = _deltas(pool, sites, token_slots, x, joint_calls)
    assert took_joint == takes_joint
    assert not torch.equal(separate, base)  # the adapters change something
    torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_sites_on_a_prefill_chunk_and_decode_rows(tmp_path, arch, dtype, monkeypatch):
    """A 20-row prefill chunk (a row run) plus decode rows (padded), in both pool dtypes."""
    joint_calls: list[int] = []
    real = model_lora.lora_apply_joint
    monkeypatch.setattr(
        model_lora, "lora_apply_joint", lambda *a, **k: joint_calls.append(1) or real(*a, **k)
    )
    pool = _pool(tmp_path, arch, dtype)
    token_slots = [0] * 20 + [0, -1, 0, 0]
    x = torch.randn(len(token_slots), arch.hidden_size, generator=torch.Generator().manual_seed(2))
    for sites in (QKV, GATE_UP):
        base, separate, joint, took_joint = _deltas(
            pool, sites, token_slots, x.to(dtype), joint_calls
        )
        assert took_joint and not torch.equal(separate, base)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        scale = float(separate.float().abs().max())
        assert float((joint.float() - separate.float()).abs().max()) / scale < tol
