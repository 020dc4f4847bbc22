"""The benchmarks' model shapes (bench/shapes.py) and synthetic adapters (bench/common.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.common import load_ours, load_peft, make_adapters
from bench.shapes import build_model_dir, shape_config
from services.inference.engine import Engine

# Llama-3.2-1B's published parameter count (tied input and output embeddings).
LLAMA_3_2_1B_PARAMETERS = 1_235_814_400


def test_llama_1b_shape_has_the_real_models_parameter_count():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config("llama-1b"))
    assert sum(p.numel() for p in model.parameters()) == LLAMA_3_2_1B_PARAMETERS


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="llama-8x1024"):
        shape_config("llama-70b")


def test_random_model_and_adapters_serve_like_peft(tmp_path):
    """A random model of a Llama-3 shape (GQA, llama3 RoPE) with the benchmark's random
    adapters: they are real PEFT adapters of the ranks asked for, and a mixed batch on the
    engine equals PEFT's adapter_names= row by row."""
    model_dir = build_model_dir("llama-2x128", tmp_path / "model")
    engine = Engine(model_dir, device="cpu", dtype="float32")
    paths = make_adapters(model_dir, tmp_path, 3, ranks=(8, 32))
    ranks = [json.loads((p / "adapter_config.json").read_text())["r"] for p in paths]
    assert ranks == [8, 32, 8]
    ours = load_ours(engine, paths)
    peft = load_peft(model_dir, paths, engine.device)
    rows = [0, 1, None, 2, 1]
    ids = torch.randint(3, 3000, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        names = [f"a{r}" if r is not None else "__base__" for r in rows]
        expected = peft(input_ids=ids, adapter_names=names).logits
        with engine.adapters([ours[r] if r is not None else None for r in rows]):
            got = engine.model(input_ids=ids).logits
        with engine.adapters([None] * len(rows)):
            plain = engine.model(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    changed = (got - plain).abs().amax(dim=(1, 2))
    assert [bool(c > 1e-3) for c in changed] == [r is not None for r in rows]
