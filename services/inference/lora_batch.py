"""Per-row LoRA for one forward pass: each row of a batch may use a different adapter.

The adapters' factors are gathered once per batch composition into per-row stacked
tensors, zero-padded to the largest rank among them (a zero row of A and column of B adds
nothing), with each adapter's scaling folded into B. A module an adapter does not target
gets zeros in that adapter's rows; a row without an adapter gets zeros everywhere. Then
each layer's delta for the whole batch is two batched matmuls (the BGMV idea of Punica /
S-LoRA), not a Python loop over adapters.

Continuous batching changes the rows between two decode steps: `select` (rows leave) and
`concat` (prefilled rows join) derive the new stacks from the current ones instead of
gathering every adapter again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional

from services.inference.lora import LinearShape, LoraWeights


@dataclass(frozen=True)
class _Stacked:
    a_t: torch.Tensor  # (rows, in_features, r_max): A transposed, per row
    b_t: torch.Tensor  # (rows, r_max, out_features): scaling * B transposed, per row


# Sibling layers that read the same input in Llama-style blocks (and most others). Their A
# factors are multiplied with that input in one batched matmul instead of one each; an
# architecture where this does not hold still gets the right result (the shared product is
# reused only for the very same input tensor), just without the saving.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_OF = {member: group for group in SHARED_INPUT for member in group}


@dataclass(frozen=True)
class LoraBatch:
    rows: int
    shapes: dict[str, LinearShape]
    dtype: torch.dtype
    device: torch.device | str
    # One adapter for every row: applied directly, no stacks.
    single: LoraWeights | None = None
    modules: dict[str, _Stacked] = field(default_factory=dict)
    # Per group of siblings: (A stacks side by side, member -> its columns), built on first
    # use (None: fewer than two members here); and the input being served with its product
    # and the members yet to take theirs (dropped by the last, so no activation lingers).
    _groups: dict[str, tuple[torch.Tensor, dict[str, slice]] | None] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )
    _pending: dict[str, tuple[torch.Tensor, torch.Tensor, set[str]]] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def build(
        cls,
        row_adapters: Sequence[LoraWeights | None],
        shapes: dict[str, LinearShape],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> LoraBatch:
        base = cls(len(row_adapters), shapes, dtype, device)
        distinct = list({id(a): a for a in row_adapters if a is not None}.values())
        if len(distinct) == 1 and all(a is not None for a in row_adapters):
            return replace(base, single=distinct[0])
        # Row -> slot in the stacks below; slot 0 is all zeros (a row without an adapter).
        slot_of = {id(a): i + 1 for i, a in enumerate(distinct)}
        rows = torch.tensor([slot_of[id(a)] if a is not None else 0 for a in row_adapters])
        rows = rows.to(device)
        for name in sorted({n for a in distinct for n in a.modules}):
            shape = shapes[name]
            rank = max(a.modules[name].a.shape[0] for a in distinct if name in a.modules)
            slots = len(distinct) + 1
            a_t = torch.zeros(slots, shape.in_features, rank, dtype=dtype, device=device)
            b_t = torch.zeros(slots, rank, shape.out_features, dtype=dtype, device=device)
            for slot, adapter in enumerate(distinct, start=1):
                lora = adapter.modules.get(name)
                if lora is not None:
                    r = lora.a.shape[0]
                    a_t[slot, :, :r] = lora.a.T
                    b_t[slot, :r, :] = lora.b.T * lora.scaling
            # One copy per distinct adapter above, then one gather for all rows.
            base.modules[name] = _Stacked(a_t[rows], b_t[rows])
        return base

    def select(self, index: torch.Tensor) -> LoraBatch:
        """The rows at `index`, in that order."""
        modules = {n: _Stacked(s.a_t[index], s.b_t[index]) for n, s in self.modules.items()}
        return replace(self, rows=len(index), modules=modules)

    def concat(self, other: LoraBatch) -> LoraBatch:
        """These rows followed by `other`'s."""
        if self.single is not None and self.single is other.single:
            return replace(self, rows=self.rows + other.rows)
        modules = {}
        for name in sorted(self._names() | other._names()):
            mine, theirs = self._stacked(name), other._stacked(name)
            rank = max(s.a_t.shape[2] for s in (mine, theirs) if s is not None)
            a_parts, b_parts = [], []
            for stacked, owner in ((mine, self), (theirs, other)):
                stacked = stacked or owner._zeros(name, rank)
                pad = rank - stacked.a_t.shape[2]
                a_parts.append(functional.pad(stacked.a_t, (0, pad)))
                b_parts.append(functional.pad(stacked.b_t, (0, 0, 0, pad)))
            modules[name] = _Stacked(torch.cat(a_parts), torch.cat(b_parts))
        return replace(self, rows=self.rows + other.rows, single=None, modules=modules)

    def _names(self) -> set[str]:
        return set(self.single.modules) if self.single is not None else set(self.modules)

    def _stacked(self, name: str) -> _Stacked | None:
        """Module `name`'s per-row stacks (expanded views for the one-adapter form)."""
        if self.single is None:
            return self.modules.get(name)
        lora = self.single.modules.get(name)
        if lora is None:
            return None
        a_t = lora.a.T.to(self.dtype).expand(self.rows, -1, -1)
        b_t = (lora.b.T * lora.scaling).to(self.dtype).expand(self.rows, -1, -1)
        return _Stacked(a_t, b_t)

    def _zeros(self, name: str, rank: int) -> _Stacked:
        shape, like = self.shapes[name], {"dtype": self.dtype, "device": self.device}
        return _Stacked(
            torch.zeros(self.rows, shape.in_features, rank, **like),
            torch.zeros(self.rows, rank, shape.out_features, **like),
        )

    def add_to(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        """output += module `name`'s LoRA contribution for input x, in place (the output
        is the base layer's fresh result, which nothing else holds yet)."""
        stacked = self.modules.get(name) if self.single is None else None
        if stacked is None:
            delta = self.delta(name, x)
            if delta is not None:
                output.add_(delta.to(output.dtype))
            return
        x = x.to(stacked.a_t.dtype)
        shared = self._shared_product(name, x)
        xa = shared if shared is not None else torch.bmm(x, stacked.a_t)
        output.baddbmm_(xa, stacked.b_t)  # output + (x Aᵀ) Bᵀ in one kernel

    def _shared_product(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """x Aᵀ for `name` from one matmul shared with its siblings, or None."""
        parent, _, leaf = name.rpartition(".")
        group = _GROUP_OF.get(leaf)
        if group is None:
            return None
        key = f"{parent}.{group[0]}"
        if key not in self._groups:
            members = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in self.modules]
            if len(members) < 2:
                self._groups[key] = None
            else:
                columns, start = {}, 0
                for member in members:
                    rank = self.modules[member].a_t.shape[2]
                    columns[member] = slice(start, start + rank)
                    start += rank
                joined = torch.cat([self.modules[m].a_t for m in members], dim=2)
                self._groups[key] = (joined, columns)
        fused = self._groups[key]
        if fused is None:
            return None
        joined, columns = fused
        pending = self._pending.get(key)
        if pending is None or pending[0] is not x or name not in pending[2]:
            pending = (x, torch.bmm(x, joined), set(columns))
            self._pending[key] = pending
        pending[2].discard(name)
        if not pending[2]:
            del self._pending[key]
        return pending[1][..., columns[name]]

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
