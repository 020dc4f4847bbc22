"""Per-row LoRA for one forward pass: each row of a batch may use a different adapter.

Rows are grouped by adapter, as Punica's and S-LoRA's segmented kernels (SGMV) do. Each
module stacks the factors of the distinct adapters that target it, once per batch
composition, zero-padded to the largest rank among them (a zero row of A and column of B
adds nothing), with each adapter's scaling folded into B. A layer's delta is then: gather
the rows into one block per adapter (blocks padded to the largest group), two batched
matmuls over the blocks, and one indexed add of the real rows into the output. Each
adapter's weights are read once per layer, however many rows use it, so the work and
the stacks' memory grow with the number of distinct adapters, not with the rows; and
the number of operations per layer is the same for 2 adapters or 200. A row without an
adapter is in no block. A batch with one adapter in every row uses plain matmuls.

Continuous batching changes the rows between two decode steps: `select` (rows leave) and
`concat` (prefilled rows join) derive the new batch from the current one, keeping the
stacks when the set of adapters is unchanged and stacking only adapters that are new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional

from services.inference.lora import LinearShape, LoraWeights


@dataclass(frozen=True)
class _Stacked:
    a_t: torch.Tensor  # (slots, in_features, r_max): A transposed, per adapter
    b_t: torch.Tensor  # (slots, r_max, out_features): scaling * B transposed, per adapter
    slots: tuple[int, ...]  # each slot's adapter, as an index into LoraBatch.adapters


@dataclass(frozen=True)
class _Plan:
    """Where each slot's rows are: x[gather] is (slots * width) rows, slot by slot, padded
    to `width` rows each by repeating one; `keep` picks the real ones (None: all are),
    and `dest` is the row of each, in that order."""

    gather: torch.Tensor
    width: int
    keep: torch.Tensor | None
    dest: torch.Tensor


def _stack(
    adapters: Sequence[LoraWeights],
    first_index: int,
    shapes: dict[str, LinearShape],
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, _Stacked]:
    """Per module, the factors of those adapters that target it (adapter i is index
    first_index + i in the batch's adapters)."""
    modules = {}
    for name in sorted({n for a in adapters for n in a.modules}):
        owners = [i for i, a in enumerate(adapters) if name in a.modules]
        rank = max(adapters[i].modules[name].a.shape[0] for i in owners)
        shape = shapes[name]
        a_t = torch.zeros(len(owners), shape.in_features, rank, dtype=dtype, device=device)
        b_t = torch.zeros(len(owners), rank, shape.out_features, dtype=dtype, device=device)
        for slot, i in enumerate(owners):
            lora = adapters[i].modules[name]
            r = lora.a.shape[0]
            a_t[slot, :, :r] = lora.a.T
            b_t[slot, :r, :] = lora.b.T * lora.scaling
        modules[name] = _Stacked(a_t, b_t, tuple(first_index + i for i in owners))
    return modules


@dataclass(frozen=True)
class LoraBatch:
    rows: int
    shapes: dict[str, LinearShape]
    dtype: torch.dtype
    device: torch.device | str
    # One adapter for every row: applied directly, no stacks.
    single: LoraWeights | None = None
    # Otherwise: the distinct adapters, each row's index into them (-1: no adapter), and
    # per module the stacked factors of the adapters that target it.
    adapters: tuple[LoraWeights, ...] = ()
    row_slots: tuple[int, ...] = ()
    modules: dict[str, _Stacked] = field(default_factory=dict)
    # Per slot tuple, its plan (None: no row uses these adapters); and the last gathered
    # input, which sibling layers reading the same input (q/k/v, gate/up) reuse.
    _plans: dict[tuple[int, ...], _Plan | None] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )
    _gathered: dict[str, tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = field(
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
        index = {id(a): i for i, a in enumerate(distinct)}
        row_slots = tuple(index[id(a)] if a is not None else -1 for a in row_adapters)
        modules = _stack(distinct, 0, shapes, dtype, device)
        return replace(base, adapters=tuple(distinct), row_slots=row_slots, modules=modules)

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks this batch holds (none in the one-adapter form)."""
        return sum(s.a_t.nbytes + s.b_t.nbytes for s in self.modules.values())

    def select(self, index: torch.Tensor) -> LoraBatch:
        """The rows at `index`, in that order."""
        if self.single is not None:
            return replace(self, rows=len(index))
        row_slots = [self.row_slots[i] for i in index.tolist()]
        used = sorted({s for s in row_slots if s >= 0})
        if len(used) == len(self.adapters):
            return replace(self, rows=len(row_slots), row_slots=tuple(row_slots))
        # Adapters no row uses any more leave the stacks.
        renumber = {old: new for new, old in enumerate(used)}
        modules = {}
        for name, stacked in self.modules.items():
            kept = [j for j, s in enumerate(stacked.slots) if s in renumber]
            if kept:
                at = torch.tensor(kept, device=stacked.a_t.device)
                slots = tuple(renumber[stacked.slots[j]] for j in kept)
                modules[name] = _Stacked(stacked.a_t[at], stacked.b_t[at], slots)
        return replace(
            self,
            rows=len(row_slots),
            adapters=tuple(self.adapters[i] for i in used),
            row_slots=tuple(renumber.get(s, -1) for s in row_slots),
            modules=modules,
        )

    def concat(self, other: LoraBatch) -> LoraBatch:
        """These rows followed by `other`'s."""
        if self.single is not None and self.single is other.single:
            return replace(self, rows=self.rows + other.rows)
        mine, theirs = self._grouped(), other._grouped()
        index = {id(a): i for i, a in enumerate(mine.adapters)}
        new = [a for a in theirs.adapters if id(a) not in index]
        for a in new:
            index[id(a)] = len(index)
        their_slots = [index[id(theirs.adapters[s])] if s >= 0 else -1 for s in theirs.row_slots]
        modules = dict(mine.modules)
        added = _stack(new, len(mine.adapters), self.shapes, self.dtype, self.device)
        for name, extra in added.items():
            present = modules.get(name)
            modules[name] = extra if present is None else _joined(present, extra)
        return replace(
            mine,
            rows=self.rows + other.rows,
            adapters=mine.adapters + tuple(new),
            row_slots=mine.row_slots + tuple(their_slots),
            modules=modules,
        )

    def _grouped(self) -> LoraBatch:
        """This batch in the grouped form (the one-adapter form stacked)."""
        if self.single is None:
            return self
        modules = _stack([self.single], 0, self.shapes, self.dtype, self.device)
        return replace(
            self, single=None, adapters=(self.single,), row_slots=(0,) * self.rows, modules=modules
        )

    def _plan(self, slots: tuple[int, ...]) -> _Plan | None:
        if slots not in self._plans:
            groups = [[r for r, s in enumerate(self.row_slots) if s == slot] for slot in slots]
            groups = [g for g in groups if g]
            width = max((len(g) for g in groups), default=0)
            if not width:
                self._plans[slots] = None
                return None
            gather, keep = [], []
            for g in groups:
                keep += range(len(gather), len(gather) + len(g))
                gather += g + [g[0]] * (width - len(g))
            device = self.device
            self._plans[slots] = _Plan(
                gather=torch.tensor(gather, device=device),
                width=width,
                keep=None if len(keep) == len(gather) else torch.tensor(keep, device=device),
                dest=torch.tensor([r for g in groups for r in g], device=device),
            )
        return self._plans[slots]

    def add_to(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        """output += module `name`'s LoRA contribution for input x, in place (the output
        is the base layer's fresh result, which nothing else holds yet)."""
        if self.single is not None:
            lora = self.single.modules.get(name)
            if lora is not None:  # scaling applied by the add itself: no scaled copy
                xab = (x.to(lora.a.dtype) @ lora.a.T) @ lora.b.T
                output.add_(xab.to(output.dtype), alpha=lora.scaling)
            return
        stacked = self.modules.get(name)
        plan = self._plan(stacked.slots) if stacked is not None else None
        if plan is None:
            return
        last = self._gathered.get("last")
        if last is not None and last[0] is x and last[1] == stacked.slots:
            blocks = last[2]
        else:
            blocks = x.to(stacked.a_t.dtype)[plan.gather]
            blocks = blocks.reshape(-1, plan.width * x.shape[1], x.shape[2])
            self._gathered["last"] = (x, stacked.slots, blocks)
        out = torch.bmm(torch.bmm(blocks, stacked.a_t), stacked.b_t)
        out = out.reshape(-1, x.shape[1], out.shape[-1])
        if plan.keep is not None:
            out = out[plan.keep]
        output.index_add_(0, plan.dest, out.to(output.dtype))

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA contribution to module `name`'s output for input x (rows, seq, in)."""
        if self.single is not None:
            lora = self.single.modules.get(name)
            if lora is None:
                return None
            return ((x.to(lora.a.dtype) @ lora.a.T) @ lora.b.T) * lora.scaling
        if name not in self.modules:
            return None
        out = x.new_zeros(*x.shape[:2], self.shapes[name].out_features, dtype=self.dtype)
        self.add_to(name, x, out)
        return out


def _joined(first: _Stacked, second: _Stacked) -> _Stacked:
    """Two stacks of one module, slot after slot, padded to the larger rank."""
    rank = max(first.a_t.shape[2], second.a_t.shape[2])
    a_parts, b_parts = [], []
    for stacked in (first, second):
        pad = rank - stacked.a_t.shape[2]
        a_parts.append(functional.pad(stacked.a_t, (0, pad)))
        b_parts.append(functional.pad(stacked.b_t, (0, 0, 0, pad)))
    return _Stacked(torch.cat(a_parts), torch.cat(b_parts), first.slots + second.slots)
