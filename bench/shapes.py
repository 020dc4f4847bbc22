"""Randomly initialised models of real architectures' shapes, for the benchmarks' `--shape`.

Speed depends on a model's shape, not its weights, so a benchmark can measure the engine
at the sizes users serve without downloading anything: `build_model_dir` writes a model
directory (config, random safetensors weights, the repo's own tokenizer) that the engine
and PEFT load like any other. Token ids the tokenizer does not know decode to nothing,
so a vocabulary larger than the tokenizer's is fine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from services.inference.settings import InferenceSettings

TINY = "tiny"  # the repo's own trained loraplex-tiny (the default)

# Llama-3.2-1B's config (meta-llama/Llama-3.2-1B config.json), written out here.
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}

SHAPES: dict[str, dict | None] = {
    TINY: None,
    "llama-1b": LLAMA_3_2_1B,
    # Llama-3.2-1B's proportions (MLP 4x wide, 64-wide heads, 4 query heads per KV head)
    # at half the width and 8 layers, small enough for 2 CPU cores. Its vocabulary is the
    # repo tokenizer's (3,072), so the layers, where LoRA works, dominate the cost, not
    # the output head: the harder case for LoRA's relative overhead.
    "llama-8x1024": LLAMA_3_2_1B
    | {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 3072,
    },
    # A few MB: for tests of the benchmarks themselves.
    "llama-2x128": LLAMA_3_2_1B
    | {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 3072,
    },
}

# What the model directory needs besides config and weights: the repo model's tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def shape_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES or SHAPES[shape] is None:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)} (not {TINY})")
    # Special token ids as the repo tokenizer numbers them.
    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model_dir(shape: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A model directory of this shape with random weights (seeded), or the repo's tiny
    model's own directory for "tiny"."""
    tiny = InferenceSettings().model_dir
    if shape == TINY:
        return tiny
    config = shape_config(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        shutil.copy(tiny / name, out / name)
    return out


def storage_dtype(dtype: str) -> torch.dtype:
    """The dtype to write a random model in: bfloat16 when it will run in bfloat16 (half
    the bytes to write and read for a 1B model), else float32."""
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32
