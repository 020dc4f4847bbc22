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
        adapters = list(distinct.values())
        # Row -> slot in the stacks below; slot 0 is all zeros (a row without an adapter).
        slot_of = {id(a): i + 1 for i, a in enumerate(adapters)}
        rows = torch.tensor([slot_of[id(a)] if a is not None else 0 for a in row_adapters])
        rows = rows.to(device)
        for name in sorted({n for a in adapters for n in a.modules}):
            shape = shapes[name]
            rank = max(a.modules[name].a.shape[0] for a in adapters if name in a.modules)
            slots = len(adapters) + 1
            a_t = torch.zeros(slots, shape.in_features, rank, dtype=dtype, device=device)
            b_t = torch.zeros(slots, rank, shape.out_features, dtype=dtype, device=device)
            for slot, adapter in enumerate(adapters, start=1):
                lora = adapter.modules.get(name)
                if lora is not None:
                    r = lora.a.shape[0]
                    a_t[slot, :, :r] = lora.a.T
                    b_t[slot, :r, :] = lora.b.T * lora.scaling
            # One copy per distinct adapter above, then one gather for all rows.
            self.modules[name] = _Stacked(a_t[rows], b_t[rows])

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
