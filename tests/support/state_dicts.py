"""State dicts and pickles for the `.bin` reading tests."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch


class MakesAFolder:
    """Unpickling this calls os.makedirs: reading it must never do that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (self.marker,)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Float dtypes, a Parameter, views at an offset and transposed, an empty tensor."""
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
