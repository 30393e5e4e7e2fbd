"""parse_adapter_config: how each family uses each projection site (mixlora_spec.md §1.2)."""

from __future__ import annotations

import pytest
from support.config_parsing import ATTN, MLP, PROJECTIONS, config_for, parse

from mixserve.adapters import SiteKind

# how each family uses each projection site


@pytest.mark.parametrize(
    ("strategy", "attn_kind", "mlp_kind"),
    [
        (None, SiteKind.LORA, SiteKind.LORA),
        ("mixlora", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("mixlora-dynamic", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("mixlora-switch", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("loramoe", SiteKind.LORA, SiteKind.ROUTED),
        ("mola", SiteKind.ROUTED, SiteKind.ROUTED),
        ("dynmole", SiteKind.ROUTED, SiteKind.ROUTED),
    ],
)
def test_site_kind_per_family(strategy: str | None, attn_kind: SiteKind, mlp_kind: SiteKind):
    spec = parse(config_for(strategy))
    experts = 1 if strategy is None else 4
    for proj in ATTN:
        assert spec.site_kind(proj) is attn_kind, proj
        assert spec.site_experts(proj) == (1 if attn_kind is SiteKind.LORA else experts)
    for proj in MLP:
        assert spec.site_kind(proj) is mlp_kind, proj
        assert spec.site_experts(proj) == (1 if mlp_kind is SiteKind.LORA else experts)


def test_untargeted_sites_are_none():
    spec = parse(config_for("mola", target_modules=["k_proj", "up_proj"]))
    assert [spec.site_kind(p) for p in PROJECTIONS] == [
        SiteKind.NONE,
        SiteKind.ROUTED,
        SiteKind.NONE,
        SiteKind.NONE,
        SiteKind.NONE,
        SiteKind.ROUTED,
        SiteKind.NONE,
    ]
