"""compose() equals PEFT's LoraModel.add_weighted_adapter, module by module, for every method.

The demo adapters have different ranks (8/16) and target modules, which cat and svd take;
linear, ties and DARE need one rank, so three synthetic rank-8 adapters with different
target modules and lora_alpha are made here with fixed seeds. ΔW = scaling·B·A of every
module of PEFT's composed adapter is compared with ours.

DARE randomness: PEFT draws its masks with torch.bernoulli from torch's global RNG, but
add_weighted_adapter first initialises the new adapter's weights (inject_adapter), which
also draws from it. So the test seeds the global RNG right after inject_adapter, i.e. right
before PEFT's first mask, and PEFT's code runs unmodified; compose() gets the same seed (or,
in the "global" cases, draws from the global RNG seeded the same way). The masks are then
PEFT's exact masks, not merely masks with the same statistics.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.inference.compose import (
    COMPOSITION_METHODS,
    MAX_COMPOSED_ADAPTERS,
    MAX_COMPOSITION_WEIGHT,
    compose,
    composition_key,
)
from services.inference.engine import Engine
from services.inference.lora import LinearShape, LoraWeights, parse_adapter
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, DEMO_TENANTS, load_lora_weights

# name -> (lora_alpha, target modules, seed): one rank, different targets and scalings.
SYNTHETIC = {
    "syn_a": (16, ["q_proj", "v_proj", "down_proj"], 1),
    "syn_b": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], 2),
    "syn_c": (32, ["q_proj", "gate_proj", "up_proj"], 3),
}
SYN = list(SYNTHETIC)
DEMO = list(DEMO_TENANTS)  # retailer r8, bank r16, airline r8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """LAPACK's SVD on two threads of a busy 2-core machine is up to 20x slower than on one;
    PEFT and compose() run under the same setting, so the comparison is unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def base_model():
    model = AutoModelForCausalLM.from_pretrained(InferenceSettings().model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dirs(base_model, tmp_path_factory):
    dirs = {t: DEMO_ADAPTERS / t for t in DEMO_TENANTS}
    for name, (alpha, targets, seed) in SYNTHETIC.items():
        config = LoraConfig(r=8, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base_model), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:  # B is zero after PEFT's init: give it values
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def reference(base_model, adapter_dirs):
    """One PEFT model with every adapter loaded; each test adds (and deletes) its own mix."""
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(
        copy.deepcopy(base_model), adapter_dirs[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def ours(engine, adapter_dirs) -> dict[str, LoraWeights]:
    return {n: load_lora_weights(d, engine.linear_shapes) for n, d in adapter_dirs.items()}


_names = (f"mix{i}" for i in itertools.count())


def peft_add(reference, names, weights, method, *, seed=None, **kwargs) -> str:
    """PEFT's add_weighted_adapter; the global RNG seeded right before its first mask."""
    mix = next(_names)
    lora_model = reference.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kw):
        result = inject(*args, **kw)
        if seed is not None:
            torch.manual_seed(seed)
        return result

    lora_model.inject_adapter = inject_then_seed
    try:
        reference.add_weighted_adapter(names, weights, mix, combination_type=method, **kwargs)
    finally:
        del lora_model.inject_adapter
    return mix


def peft_deltas(reference, adapter: str) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.get_delta_weight(adapter).detach()
        for name, module in reference.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def our_deltas(weights: LoraWeights) -> dict[str, torch.Tensor]:
    return {name: (m.b @ m.a) * m.scaling for name, m in weights.modules.items()}


def assert_same_deltas(ours_: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours_) == sorted(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours_[name], expected, rtol=1e-5, atol=1e-5, msg=name)


# (adapters, weights, method, compose/PEFT kwargs, rng): rng "seed" passes the seed to
# compose(); "global" seeds torch's global RNG before compose() instead.
CASES = {
    "cat-demo-ranks-8-16": (DEMO, [0.7, -0.4, 1.3], "cat", {}, None),
    "cat-synthetic": (SYN, [1.0, 0.5, -0.8], "cat", {}, None),
    "svd-demo-default-rank": (DEMO, [0.7, -0.4, 1.3], "svd", {}, None),
    "svd-demo-rank4-clamp": (
        DEMO,
        [1.0, 0.5, 0.25],
        "svd",
        {"svd_rank": 4, "svd_clamp": 0.9},
        None,
    ),
    "svd-reduced-matrices": (
        ["syn_a", "bank"],
        [0.8, 0.6],
        "svd",
        {"svd_rank": 12, "svd_full_matrices": False},
        None,
    ),
    "linear": (SYN, [0.6, -1.2, 0.9], "linear", {}, None),
    "ties-total": (SYN, [0.6, -1.2, 0.9], "ties", {"density": 0.5}, None),
    "ties-frequency": (
        SYN,
        [1.0, 0.7, -0.5],
        "ties",
        {"density": 0.3, "majority_sign_method": "frequency"},
        None,
    ),
    "dare_linear": (SYN, [0.6, -1.2, 0.9], "dare_linear", {"density": 0.6, "seed": 1234}, "seed"),
    "dare_linear-global-rng": (
        SYN,
        [0.6, 1.2, 0.9],
        "dare_linear",
        {"density": 0.4, "seed": 5},
        "global",
    ),
    "dare_ties-total": (SYN, [0.6, -1.2, 0.9], "dare_ties", {"density": 0.5, "seed": 7}, "seed"),
    "dare_ties-frequency-global-rng": (
        SYN,
        [1.0, 0.7, -0.5],
        "dare_ties",
        {"density": 0.4, "majority_sign_method": "frequency", "seed": 99},
        "global",
    ),
    # PEFT composes one adapter as linear (exact w·ΔW), ignoring svd_rank: so do we.
    "single-adapter-svd": (["bank"], [0.6], "svd", {"svd_rank": 2}, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_delta_w_equals_peft_add_weighted_adapter(engine, reference, ours, case):
    names, weights, method, kwargs, rng = case
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    mix = peft_add(reference, names, weights, method, seed=seed, **kwargs)
    try:
        expected = peft_deltas(reference, mix)
    finally:
        reference.delete_adapter(mix)

    inputs = [ours[n] for n in names]
    if rng == "global":
        torch.manual_seed(seed)
        composed = compose(inputs, weights, method, base_linears=engine.linear_shapes, **kwargs)
    else:
        composed = compose(
            inputs, weights, method, base_linears=engine.linear_shapes, seed=seed, **kwargs
        )
    assert_same_deltas(our_deltas(composed), expected)
    # The union of the inputs' modules, each with scaling folded in.
    assert set(composed.modules) == {m for n in names for m in ours[n].modules}
    assert {m.scaling for m in composed.modules.values()} == {1.0}


def test_cat_is_exact_and_svd_at_full_rank_is_exact(engine, ours):
    weights = [0.7, -0.4, 1.3]
    exact = {}
    for w, name in zip(weights, DEMO, strict=True):
        for module, delta in our_deltas(ours[name]).items():
            exact[module] = exact.get(module, 0) + w * delta
    cat = compose([ours[n] for n in DEMO], weights, "cat")
    assert_same_deltas(our_deltas(cat), exact)
    assert max(m.a.shape[0] for m in cat.modules.values()) == 8 + 16 + 8
    full = compose([ours[n] for n in DEMO], weights, "svd", svd_rank=32)
    assert_same_deltas(our_deltas(full), exact)


def test_dare_masks_follow_the_seed(ours):
    inputs = [ours[n] for n in SYN]
    first = compose(inputs, [1.0, 1.0, 1.0], "dare_ties", density=0.5, seed=3)
    again = compose(
        inputs,
        [1.0, 1.0, 1.0],
        "dare_ties",
        density=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    other = compose(inputs, [1.0, 1.0, 1.0], "dare_ties", density=0.5, seed=4)
    for name, module in first.modules.items():
        assert torch.equal(module.a, again.modules[name].a)
        assert torch.equal(module.b, again.modules[name].b)
    assert any(not torch.equal(m.a, other.modules[n].a) for n, m in first.modules.items())


@pytest.mark.parametrize("method", COMPOSITION_METHODS)
def test_input_order_matters_only_where_the_key_keeps_it(ours, method):
    """The cache key sorts the parts except for DARE: check that this is what compose does."""
    names = SYN if method not in ("cat", "svd") else DEMO
    weights = [0.6, -1.2, 0.9]
    params = {"density": 0.5, "seed": 11} if method not in ("cat", "svd", "linear") else {}
    if method == "ties":
        params.pop("seed")
    forward = compose([ours[n] for n in names], weights, method, **params)
    backward = compose([ours[n] for n in reversed(names)], weights[::-1], method, **params)
    key_forward = composition_key(list(zip(names, weights, strict=True)), method, params)
    key_backward = composition_key(
        list(zip(reversed(names), weights[::-1], strict=True)), method, params
    )
    same_key = key_forward == key_backward
    assert same_key == (not method.startswith("dare"))
    deltas_f, deltas_b = our_deltas(forward), our_deltas(backward)
    close = all(torch.allclose(deltas_f[n], deltas_b[n], rtol=1e-5, atol=1e-6) for n in deltas_f)
    assert close == same_key


PROMPTS = [
    "Customer: Where is my order?\nAgent:",
    "Customer: I lost my debit card.\nAgent:",
    "Customer: Can I change my seat?\nAgent:",
]


@pytest.mark.parametrize(
    ("names", "weights", "method", "kwargs"),
    [
        (DEMO, [0.7, -0.4, 1.3], "cat", {}),
        (SYN, [0.6, -1.2, 0.9], "dare_ties", {"density": 0.5, "seed": 21}),
    ],
    ids=["cat-demo", "dare_ties-synthetic"],
)
def test_composed_adapter_in_a_mixed_batch_equals_peft(
    engine, reference, ours, names, weights, method, kwargs
):
    """The composed LoraWeights served through LoraBatch next to a plain adapter and a base
    row give PEFT's logits with its composed adapter (adapter_names=...)."""
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    composed = compose(
        [ours[n] for n in names],
        weights,
        method,
        base_linears=engine.linear_shapes,
        seed=seed,
        **kwargs,
    )
    encoded = [engine.encode(p) for p in PROMPTS]
    length = min(len(e) for e in encoded)
    ids = torch.tensor([e[:length] for e in encoded])
    mix = peft_add(reference, names, weights, method, seed=seed, **kwargs)
    try:
        with torch.inference_mode():
            expected = reference(input_ids=ids, adapter_names=[mix, "retailer", "__base__"]).logits
    finally:
        reference.delete_adapter(mix)
    with torch.inference_mode():
        with engine.adapters([composed, ours["retailer"], None]):
            got = engine.model(input_ids=ids).logits
        with engine.adapters([None] * len(PROMPTS)):
            plain = engine.model(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got[0] - plain[0]).abs().max().item() > 1e-3  # the composition does something


# -- bad input ------------------------------------------------------------------------------


def reason_of(call) -> str:
    with pytest.raises(InvalidArgument) as info:
        call()
    return info.value.reason


@pytest.mark.parametrize(
    "weights",
    [
        [math.nan, 1.0, 1.0],
        [1.0, math.inf, 1.0],
        [1.0, 1.0, -math.inf],
        [1e38, 1.0, 1.0],  # finite, but it overflows a forward pass
        [1.0, -(MAX_COMPOSITION_WEIGHT + 1), 1.0],
        [0.0, 0.0, -0.0],
        [1, 2],
    ],
    ids=["nan", "inf", "-inf", "huge", "beyond-bound", "all-zero", "count-mismatch"],
)
def test_bad_weights_are_refused(ours, weights):
    inputs = [ours[n] for n in SYN]
    assert reason_of(lambda: compose(inputs, weights, "cat")) == "BAD_COMPOSITION_WEIGHTS"
    if len(weights) == len(SYN):
        parts = list(zip(SYN, weights, strict=True))
        assert reason_of(lambda: composition_key(parts, "cat")) == "BAD_COMPOSITION_WEIGHTS"


def test_too_many_adapters_are_refused(ours):
    many = [ours["syn_a"]] * (MAX_COMPOSED_ADAPTERS + 1)
    weights = [1.0] * len(many)
    assert reason_of(lambda: compose(many, weights, "cat")) == "TOO_MANY_ADAPTERS"
    assert compose(many[:MAX_COMPOSED_ADAPTERS], weights[:-1], "cat").rank == 8 * 8
    # The caller's configured limit.
    three = [ours[n] for n in SYN]
    assert reason_of(lambda: compose(three, [1, 1, 1], "cat", max_adapters=2)) == (
        "TOO_MANY_ADAPTERS"
    )
    parts = [(f"a{i}", 1.0) for i in range(3)]
    assert reason_of(lambda: composition_key(parts, "cat", max_adapters=2)) == "TOO_MANY_ADAPTERS"
    assert reason_of(lambda: compose([], [], "cat")) == "NO_ADAPTERS"


@pytest.mark.parametrize("method", ["average", "ties_svd", "", None])
def test_unknown_method_is_refused(ours, method):
    inputs = [ours[n] for n in SYN]
    assert reason_of(lambda: compose(inputs, [1, 1, 1], method)) == "UNKNOWN_COMPOSITION_METHOD"
    assert reason_of(lambda: composition_key([("a", 1.0)], method)) == (
        "UNKNOWN_COMPOSITION_METHOD"
    )


@pytest.fixture(scope="module")
def foreign(foreign_adapter_files) -> LoraWeights:
    """A real PEFT adapter for another (smaller) Llama, parsed against its own base's shapes."""
    tensors = load_safetensors(foreign_adapter_files["adapter_model.safetensors"])
    shapes = {}
    for key, tensor in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        shape = shapes.setdefault(module, [0, 0])
        if ".lora_A." in key:
            shape[0] = tensor.shape[1]
        else:
            shape[1] = tensor.shape[0]
    return parse_adapter(
        foreign_adapter_files["adapter_config.json"],
        foreign_adapter_files["adapter_model.safetensors"],
        {m: LinearShape(i, o) for m, (i, o) in shapes.items()},
        dtype=torch.float32,
    )


def test_adapters_of_different_base_models_are_refused(engine, ours, foreign):
    mixed = [ours["retailer"], foreign]
    for method in ("cat", "svd"):
        assert reason_of(lambda m=method: compose(mixed, [1, 1], m)) == "INCOMPATIBLE_ADAPTERS"
    # Alone, it is refused against the base model it would be served on.
    assert reason_of(
        lambda: compose([foreign], [1.0], "cat", base_linears=engine.linear_shapes)
    ) == ("INCOMPATIBLE_ADAPTERS")


def test_linear_family_with_different_ranks_is_refused_like_peft(reference, ours):
    inputs = [ours["retailer"], ours["bank"]]  # rank 8 and rank 16
    for method, params in [
        ("linear", {}),
        ("ties", {"density": 0.5}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.5}),
    ]:
        with pytest.raises(ValueError, match="same r"):
            peft_add(reference, ["retailer", "bank"], [1.0, 1.0], method, **params)
        assert reason_of(lambda m=method, p=params: compose(inputs, [1, 1], m, **p)) == (
            "RANK_MISMATCH"
        )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.0}),
        ("ties", {"density": 1.5}),
        ("dare_linear", {"density": -0.1}),
        ("dare_ties", {"density": math.nan}),
        ("dare_ties", {}),  # density is needed
        ("ties", {"density": 0.5, "majority_sign_method": "mean"}),
        ("svd", {"svd_rank": 0}),
        ("svd", {"svd_clamp": 1.5}),
        ("svd", {"svd_driver": "lapack"}),
        ("dare_ties", {"density": 0.5, "seed": 1, "generator": torch.Generator()}),
    ],
    ids=[
        "density-0",
        "density-1.5",
        "density-negative",
        "density-nan",
        "density-missing",
        "sign-method",
        "svd-rank-0",
        "svd-clamp",
        "svd-driver",
        "seed-and-generator",
    ],
)
def test_bad_parameters_are_refused(ours, method, params):
    inputs = [ours[n] for n in SYN]
    assert reason_of(lambda: compose(inputs, [1, 1, 1], method, **params)) == (
        "BAD_COMPOSITION_PARAMS"
    )
    if "generator" not in params:
        parts = [(n, 1.0) for n in SYN]
        assert reason_of(lambda: composition_key(parts, method, params)) == (
            "BAD_COMPOSITION_PARAMS"
        )


def test_density_one_keeps_every_entry(ours):
    """density=1 is in range: no pruning, so dare_linear is linear (PEFT's prune())."""
    inputs = [ours[n] for n in SYN]
    dare = compose(inputs, [0.6, -1.2, 0.9], "dare_linear", density=1.0)
    linear = compose(inputs, [0.6, -1.2, 0.9], "linear")
    assert_same_deltas(our_deltas(dare), our_deltas(linear))


# -- cache key ------------------------------------------------------------------------------


def test_composition_key_is_canonical():
    parts = [("bank@v2", 0.5), ("airline@v1", 1.0)]
    swapped = parts[::-1]
    key = composition_key(parts, "cat")
    assert key == composition_key(swapped, "cat")
    assert key == composition_key([("bank@v2", 1 / 2), ("airline@v1", 1)], "cat")
    assert key == composition_key([("bank@v2", np.float32(0.5)), ("airline@v1", 1.0)], "cat")
    # Parameters a method does not use do not count; those it uses do.
    assert key == composition_key(parts, "cat", {"density": 0.5, "svd_rank": 4})
    svd = composition_key(parts, "svd", {"svd_rank": 4})
    assert svd == composition_key(swapped, "svd", {"svd_rank": 4, "svd_full_matrices": False})
    assert svd != composition_key(parts, "svd", {"svd_rank": 8})
    assert svd != key
    # DARE: the masks are drawn in input order, and depend on the seed.
    dare = composition_key(parts, "dare_ties", {"density": 0.5, "seed": 1})
    assert dare != composition_key(swapped, "dare_ties", {"density": 0.5, "seed": 1})
    assert dare != composition_key(parts, "dare_ties", {"density": 0.5, "seed": 2})
    # ... unless nothing is pruned (density 1): then neither matters.
    full = composition_key(parts, "dare_ties", {"density": 1.0, "seed": 1})
    assert full == composition_key(swapped, "dare_ties", {"density": 1, "seed": 2})
    # Other weights, other identities, a version bump: other keys.
    assert key != composition_key([("bank@v2", 0.5), ("airline@v1", -1.0)], "cat")
    assert key != composition_key([("bank@v3", 0.5), ("airline@v1", 1.0)], "cat")
    # One adapter is composed as linear whatever the method (PEFT's rule).
    one = composition_key([("bank@v2", 0.5)], "linear")
    assert one == composition_key([("bank@v2", 0.5)], "svd", {"svd_rank": 2})
    assert one == composition_key([("bank@v2", 0.5)], "dare_ties", {"density": 0.3, "seed": 4})
    # Unknown parameters are refused rather than silently ignored.
    assert reason_of(lambda: composition_key(parts, "cat", {"rank": 4})) == (
        "BAD_COMPOSITION_PARAMS"
    )
