"""Composition of several LoRA adapters, with weights, into one adapter.

The methods and their arithmetic are those of PEFT's `LoraModel.add_weighted_adapter`
(peft 0.21; tests/unit/test_compose_matches_peft.py compares the resulting ΔW module by
module against PEFT itself):

- `cat`: exact. The factors are concatenated along the rank, A_i scaled by w_i·scaling_i,
  so ΔW = Σ w_i·ΔW_i with rank Σ r_i.
- `svd`: the exact ΔW = Σ w_i·ΔW_i, truncated by SVD to `svd_rank` (default: the largest
  input rank), optionally clamped at the `svd_clamp` quantile of the factors' entries.
- `linear`, `ties`, `dare_linear`, `dare_ties`: PEFT's approximations, which merge the A
  factors and the B factors separately (weight √|w_i·scaling_i| on each side, the sign on
  A). They need equal ranks, as in PEFT. `ties` keeps each factor's `density` largest
  entries and elects a sign per entry (`majority_sign_method`); the DARE methods keep a
  random `density` fraction of the entries, rescaled by 1/density.

DARE's random masks are drawn with `torch.bernoulli` on the CPU (then moved to the
adapters' device), module by module in the base model's module order when `base_linears`
is given (else sorted by name), and within a module for every adapter's A, then every
adapter's B: exactly PEFT's calls in PEFT's order. So with `seed=s` (or a generator seeded
with s) the masks equal PEFT's when torch's global RNG is seeded with s right before PEFT
draws its first mask; with neither, the global RNG is used, as PEFT does. Masks drawn on
the CPU make a seeded composition the same on every replica, GPU or not.

A module that only some inputs target gets the sum over those that do, as in PEFT (an
absent adapter counts as zero factors). The result has its scaling folded in (scaling 1,
lora_alpha = rank, like PEFT's composed adapter), so LoraBatch applies ΔW_composed as is.

Deliberate differences from PEFT, all where PEFT would fail or give a broken adapter:
- one adapter is composed as `linear` whatever the method (PEFT does the same: svd_rank,
  density etc. are then ignored, and the result is exactly w·ΔW).
- `svd` keeps min(svd_rank, out, in) components per module; PEFT builds factors whose
  shapes do not fit when svd_rank exceeds a module's smaller dimension.
- `svd_driver` is passed to torch only on CUDA (torch refuses it on the CPU; it picks the
  algorithm, not the result).
- PEFT gives its composed adapter the first input's `use_rslora`, which multiplies ΔW by
  √rank; LoraWeights has its scaling folded in, so ours is always the ΔW above.
- `target_modules` given as a regex string (which PEFT joins with "|") is not known here;
  modules are matched by name, which is what PEFT's result amounts to.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.inference.lora import LinearShape, LoraModule, LoraWeights

COMPOSITION_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
MAX_COMPOSED_ADAPTERS = 8
MAJORITY_SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")

# Methods that merge A and B separately and so need one rank (PEFT's rule).
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
_RANDOM = ("dare_linear", "dare_ties")
# The parameters each method's result depends on (the others are ignored, as in PEFT).
_METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "cat": (),
    "svd": ("svd_rank", "svd_clamp"),
    "linear": (),
    "ties": ("density", "majority_sign_method"),
    "dare_linear": ("density", "seed"),
    "dare_ties": ("density", "majority_sign_method", "seed"),
}
_KEY_PARAMS = (
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "seed",
)


# -- validation ----------------------------------------------------------------------------


def _bad_params(message: str, param: str) -> InvalidArgument:
    return InvalidArgument(message, reason="BAD_COMPOSITION_PARAMS", param=param)


def _check_method(method: object) -> str:
    if method not in COMPOSITION_METHODS:
        raise InvalidArgument(
            f"unknown composition method {method!r}; one of: {', '.join(COMPOSITION_METHODS)}",
            reason="UNKNOWN_COMPOSITION_METHOD",
        )
    return str(method)


# Weights mix adapters (around 1 each); far larger ones only push activations toward
# overflow, where one request's numbers could turn to NaN.
MAX_COMPOSITION_WEIGHT = 100.0


def _check_weights(weights: Sequence[object], count: int, max_adapters: int) -> list[float]:
    if isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError(f"max_adapters must be a positive integer, got {max_adapters!r}")
    if count == 0:
        raise InvalidArgument("a composition needs at least one adapter", reason="NO_ADAPTERS")
    if count > max_adapters:
        raise InvalidArgument(
            f"a composition may name at most {max_adapters} adapters, got {count}",
            reason="TOO_MANY_ADAPTERS",
            limit=str(max_adapters),
        )
    if len(weights) != count:
        raise InvalidArgument(
            f"{count} adapters but {len(weights)} weights", reason="BAD_COMPOSITION_WEIGHTS"
        )
    values = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise InvalidArgument(
                f"composition weights must be numbers, got {w!r}", reason="BAD_COMPOSITION_WEIGHTS"
            )
        value = float(w)
        if not (math.isfinite(value) and abs(value) <= MAX_COMPOSITION_WEIGHT):
            raise InvalidArgument(
                f"composition weights must be finite numbers within ±{MAX_COMPOSITION_WEIGHT:g}, "
                f"got {w!r}",
                reason="BAD_COMPOSITION_WEIGHTS",
            )
        values.append(value + 0.0)  # -0.0 -> 0.0
    if all(v == 0 for v in values):
        raise InvalidArgument("composition weights are all zero", reason="BAD_COMPOSITION_WEIGHTS")
    return values


def _check_params(
    method: str,
    *,
    density: object,
    majority_sign_method: object,
    svd_rank: object,
    svd_clamp: object,
    svd_full_matrices: object,
    svd_driver: object,
    seed: object,
) -> None:
    if density is None:
        if method in _NEEDS_DENSITY:
            raise _bad_params(f"{method} needs a density in (0, 1]", "density")
    elif (
        isinstance(density, bool)
        or not isinstance(density, numbers.Real)
        or not 0 < float(density) <= 1  # also refuses NaN
    ):
        raise _bad_params(f"density must be in (0, 1], got {density!r}", "density")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise _bad_params(
            f"majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
            f"got {majority_sign_method!r}",
            "majority_sign_method",
        )
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral) or svd_rank < 1
    ):
        raise _bad_params(f"svd_rank must be a positive integer, got {svd_rank!r}", "svd_rank")
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool)
        or not isinstance(svd_clamp, numbers.Real)
        or not 0 <= float(svd_clamp) <= 1
    ):
        raise _bad_params(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}", "svd_clamp")
    if not isinstance(svd_full_matrices, bool):
        raise _bad_params("svd_full_matrices must be a boolean", "svd_full_matrices")
    if svd_driver not in SVD_DRIVERS:
        raise _bad_params(
            f"svd_driver must be one of {SVD_DRIVERS}, got {svd_driver!r}", "svd_driver"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise _bad_params(f"seed must be an integer, got {seed!r}", "seed")


def _module_order(
    adapters: Sequence[LoraWeights], base_linears: Mapping[str, LinearShape] | None
) -> list[str]:
    """Every module some input targets, checked for one shape across inputs (and the base)."""
    shapes: dict[str, tuple[int, int]] = {}
    for index, adapter in enumerate(adapters):
        for name, lora in adapter.modules.items():
            a, b = lora.a, lora.b
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InvalidArgument(
                    f"adapter {index}, {name}: A{tuple(a.shape)} and B{tuple(b.shape)} are not "
                    "LoRA factors of one rank",
                    reason="INCOMPATIBLE_ADAPTERS",
                )
            shape = (a.shape[1], b.shape[0])
            if base_linears is not None:
                base = base_linears.get(name)
                if base is None or (base.in_features, base.out_features) != shape:
                    raise InvalidArgument(
                        f"adapter {index} targets {name} as {shape[0]} -> {shape[1]}, which the "
                        "base model does not have: it was made for another base model",
                        reason="INCOMPATIBLE_ADAPTERS",
                    )
            seen = shapes.setdefault(name, shape)
            if seen != shape:
                raise InvalidArgument(
                    f"{name} is {seen[0]} -> {seen[1]} in one adapter and {shape[0]} -> "
                    f"{shape[1]} in adapter {index}: the adapters were made for different "
                    "base models",
                    reason="INCOMPATIBLE_ADAPTERS",
                )
    if base_linears is None:
        return sorted(shapes)
    return [name for name in base_linears if name in shapes]


def _check_one_rank(adapters: Sequence[LoraWeights], method: str, names: list[str]) -> None:
    ranks = sorted({a.rank for a in adapters})
    if len(ranks) > 1:
        raise InvalidArgument(
            f"{method} composition needs adapters of one rank, got ranks "
            f"{', '.join(map(str, ranks))}; use cat or svd",
            reason="RANK_MISMATCH",
        )
    for name in names:
        module_ranks = sorted({a.modules[name].a.shape[0] for a in adapters if name in a.modules})
        if len(module_ranks) > 1:
            raise InvalidArgument(
                f"{method} composition needs one rank per module; {name} has ranks "
                f"{', '.join(map(str, module_ranks))}; use cat or svd",
                reason="RANK_MISMATCH",
            )


# -- PEFT's merge arithmetic (peft/utils/merge_utils.py), with an explicit generator ---------


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    if density >= 1:
        return tensor
    probabilities = torch.full(tensor.shape, density, dtype=tensor.dtype, device="cpu")
    mask = torch.bernoulli(probabilities, generator=generator).to(tensor.device)
    return tensor * mask / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _ties_merge(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    majority = sign == torch.where(magnitude >= 0, 1, -1)
    kept = (_weighted(stacked, weights) * majority).sum(dim=0)
    return kept / torch.clamp(majority.sum(dim=0), min=1.0)


def _merge_factors(
    method: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if method == "linear":
        return _weighted(torch.stack(tensors), weights).sum(dim=0)
    assert density is not None
    if method == "ties":
        return _ties_merge(
            torch.stack([_magnitude_prune(t, density) for t in tensors]), weights, sign_method
        )
    stacked = torch.stack([_random_prune(t, density, generator) for t in tensors])
    if method == "dare_linear":
        return _weighted(stacked, weights).sum(dim=0)
    return _ties_merge(stacked, weights, sign_method)  # dare_ties


# -- composition ---------------------------------------------------------------------------


@torch.no_grad()
def compose(
    adapters: Sequence[LoraWeights],
    weights: Sequence[float],
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    base_linears: Mapping[str, LinearShape] | None = None,
    max_adapters: int = MAX_COMPOSED_ADAPTERS,
) -> LoraWeights:
    """One adapter whose ΔW is PEFT's `add_weighted_adapter(adapters, weights, method, ...)`.

    `base_linears` (Engine.linear_shapes) checks every module against the base model and
    fixes the order DARE draws its masks in to the base model's module order, PEFT's. DARE
    draws from `generator`, else a CPU generator seeded with `seed`, else torch's global
    RNG. The result has the inputs' dtype and device, with scaling 1.
    """
    method = _check_method(method)
    values = _check_weights(weights, len(adapters), max_adapters)
    _check_params(
        method,
        density=density,
        majority_sign_method=majority_sign_method,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        seed=seed,
    )
    if seed is not None and generator is not None:
        raise _bad_params("give a seed or a generator, not both", "seed")
    if generator is not None and generator.device.type != "cpu":
        raise _bad_params("DARE draws its masks on the CPU: give a CPU generator", "generator")
    names = _module_order(adapters, base_linears)
    if not names:
        raise InvalidArgument("the adapters have no LoRA modules", reason="INCOMPATIBLE_ADAPTERS")
    # PEFT composes a single adapter as `linear`, whatever the method asked for.
    if len(adapters) == 1:
        method = "linear"
    if method in _FACTORWISE:
        _check_one_rank(adapters, method, names)
    if method in _RANDOM and generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    density = None if density is None else float(density)
    svd_clamp = None if svd_clamp is None else float(svd_clamp)
    svd_target = int(svd_rank or max(a.rank for a in adapters))

    first = adapters[0].modules[next(iter(adapters[0].modules))]
    dtype, device = first.a.dtype, first.a.device
    modules: dict[str, LoraModule] = {}
    for name in names:
        present = [
            (w, a.modules[name]) for w, a in zip(values, adapters, strict=True) if name in a.modules
        ]
        if method == "cat":
            a, b = _cat(present, device)
        elif method == "svd":
            a, b = _svd(present, device, svd_target, svd_clamp, svd_full_matrices, svd_driver)
        else:
            a, b = _factorwise(present, device, method, density, majority_sign_method, generator)
        modules[name] = LoraModule(
            a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scaling=1.0
        )
    rank = max(m.a.shape[0] for m in modules.values())
    return LoraWeights(
        modules=modules,
        rank=rank,
        lora_alpha=float(rank),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in modules}),
    )


def _fp32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _cat(
    present: list[tuple[float, LoraModule]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([_fp32(m.a, device) * w * m.scaling for w, m in present], dim=0)
    b = torch.cat([_fp32(m.b, device) for _, m in present], dim=1)
    return a, b


def _svd(
    present: list[tuple[float, LoraModule]],
    device: torch.device,
    rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [(_fp32(m.b, device) @ _fp32(m.a, device)) * m.scaling for _, m in present]
    weights = torch.tensor([w for w, _ in present]).to(device)
    delta = _weighted(torch.stack(deltas), weights).sum(dim=0)
    u, s, vh = torch.linalg.svd(
        delta, full_matrices=full_matrices, driver=driver if device.type == "cuda" else None
    )
    rank = min(rank, s.shape[0])
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u = u.clamp(-high, high)
        vh = vh.clamp(-high, high)
    return vh, u


def _factorwise(
    present: list[tuple[float, LoraModule]],
    device: torch.device,
    method: str,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # sqrt(|w·scaling|) on each side, the sign on A only (PEFT's handling of negative weights).
    weights_a, weights_b = [], []
    for w, m in present:
        scaled = w * m.scaling
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    a = _merge_factors(
        method,
        [_fp32(m.a, device) for _, m in present],
        torch.tensor(weights_a).to(device),
        density,
        sign_method,
        generator,
    )
    b = _merge_factors(
        method,
        [_fp32(m.b, device) for _, m in present],
        torch.tensor(weights_b).to(device),
        density,
        sign_method,
        generator,
    )
    return a, b


# -- cache key -----------------------------------------------------------------------------


def composition_key(
    parts: Sequence[tuple[str, float]],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    max_adapters: int = MAX_COMPOSED_ADAPTERS,
) -> str:
    """A cache key equal for requests whose compositions are equal.

    `parts` are (adapter identity, weight); the identity must pin the adapter's content
    (owner, name and version, or its sha256). `params` are compose()'s keyword arguments.
    The request is validated as compose() would. Canonical form: one adapter is `linear`
    (PEFT's rule) with no parameters; only the parameters the method uses count (and DARE's
    seed only where it prunes, density < 1); weights are compared as floats; and the parts
    are sorted, except for DARE that prunes, whose random masks are drawn in input order.
    `svd_full_matrices` and `svd_driver` choose the algorithm, not the result, so they do not
    count. A DARE composition without a seed is one random draw: requests with this key then
    share that draw.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(_KEY_PARAMS))
    if unknown:
        raise _bad_params(f"unknown composition parameters: {', '.join(unknown)}", unknown[0])
    method = _check_method(method)
    for identity, _ in parts:
        if not isinstance(identity, str) or not identity:
            raise InvalidArgument(
                f"adapter identities must be non-empty strings, got {identity!r}",
                reason="BAD_COMPOSITION_PARTS",
            )
    values = _check_weights([w for _, w in parts], len(parts), max_adapters)
    full = {
        "density": None,
        "majority_sign_method": "total",
        "svd_rank": None,
        "svd_clamp": None,
        "svd_full_matrices": True,
        "svd_driver": None,
        "seed": None,
        **params,
    }
    _check_params(method, **full)
    if len(parts) == 1:
        method = "linear"
    canonical = {name: full[name] for name in _METHOD_PARAMS[method]}
    for name, kind in (("density", float), ("svd_clamp", float), ("svd_rank", int), ("seed", int)):
        if canonical.get(name) is not None:
            canonical[name] = kind(canonical[name])
    ordered = method in _RANDOM and canonical["density"] < 1
    if method in _RANDOM and not ordered:
        canonical.pop("seed")
    pairs = [[identity, value] for (identity, _), value in zip(parts, values, strict=True)]
    if not ordered:
        pairs.sort()
    text = json.dumps(
        {"method": method, "parts": pairs, "params": canonical},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "composed:" + hashlib.sha256(text.encode()).hexdigest()
