"""Per-row LoRA for one forward pass: each row of a batch may use a different adapter.

The adapters' factors are gathered once per batch composition into per-row stacked
tensors, zero-padded to the largest rank among them (a zero row of A and column of B adds
nothing), with each adapter's scaling folded into B. A module an adapter does not target
gets zeros in that adapter's rows; a row without an adapter gets zeros everywhere. Then
each layer's delta for the whole batch is two batched matmuls (the BGMV idea of Punica /
S-LoRA), not a Python loop over adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.inference.lora import LinearShape, LoraWeights


@dataclass(frozen=True)
class _Stacked:
    a_t: torch.Tensor  # (rows, in_features, r_max): A transposed, per row
    b_t: torch.Tensor  # (rows, r_max, out_features): scaling * B transposed, per row


class LoraBatch:
    def __init__(
        self,
        row_adapters: Sequence[LoraWeights | None],
        shapes: dict[str, LinearShape],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.rows = len(row_adapters)
        distinct = {id(a): a for a in row_adapters if a is not None}
        # One adapter for every row: apply its factors directly, no gather.
        self.single = (
            next(iter(distinct.values()))
            if len(distinct) == 1 and all(a is not None for a in row_adapters)
            else None
        )
        self.modules: dict[str, _Stacked] = {}
        if self.single is not None or not distinct:
            return
        names = sorted({n for a in distinct.values() for n in a.modules})
        for name in names:
            shape = shapes[name]
            rank = max(a.modules[name].a.shape[0] for a in distinct.values() if name in a.modules)
            a_t = torch.zeros(self.rows, shape.in_features, rank, dtype=dtype, device=device)
            b_t = torch.zeros(self.rows, rank, shape.out_features, dtype=dtype, device=device)
            for row, adapter in enumerate(row_adapters):
                lora = adapter.modules.get(name) if adapter is not None else None
                if lora is None:
                    continue
                r = lora.a.shape[0]
                a_t[row, :, :r] = lora.a.T
                b_t[row, :r, :] = lora.b.T * lora.scaling
            self.modules[name] = _Stacked(a_t, b_t)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA contribution to module `name`'s output for input x (rows, seq, in)."""
        if self.single is not None:
            lora = self.single.modules.get(name)
            if lora is None:
                return None
            return ((x.to(lora.a.dtype) @ lora.a.T) @ lora.b.T) * lora.scaling
        stacked = self.modules.get(name)
        if stacked is None:
            return None
        x = x.to(stacked.a_t.dtype)
        return torch.bmm(torch.bmm(x, stacked.a_t), stacked.b_t)
