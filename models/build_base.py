"""Build the default base model into models/loraplex-tiny/ (tokenizer + Llama weights).

    python -m models.build_base [--steps 420]

Deterministic for a given seed on a given machine; about 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models import corpus
from models.common import BASE_DIR, MODEL_NAME, SEED, encode, greedy, packed_batches, setup_torch
from models.common import train as train_loop

VOCAB_SIZE = 3072
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (the LlamaConfig defaults for bos/eos)
SEQ_LEN, BATCH = 256, 16
N_GENERAL, N_PER_TENANT = 34_000, 2_500  # ~2/3 general text, ~1/9 per tenant domain

STOP_STRINGS = ("\nCustomer:", "\nAgent:", "\nSystem:")

# Renders the serving chat format; user -> Customer, assistant -> Agent. No <s> here: the
# tokenizer adds it when the rendered prompt is tokenized.
CHAT_TEMPLATE = (
    "{%- set speaker = {'system': 'System', 'user': 'Customer', 'assistant': 'Agent'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in speaker -%}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ speaker[message['role']] + ': ' + (message['content'] | trim) + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Agent:' }}{%- endif -%}"
)

ARCH = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: k/v projections are narrower than q (128 vs 256)
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def build_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(BPE())
    # GPT-2 style pre-tokenization: numbers become learned chunks ("Ġ48", "21") rather than digits.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(docs, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=ARCH["max_position_embeddings"],
        name_or_path=MODEL_NAME,
    )


def generation_config(tok) -> GenerationConfig:
    # An agent turn is one line; the model may write on into the next speaker's line.
    # Note: HF generate() then needs tokenizer=... (or stop_strings=None) to run.
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=64,
        stop_strings=list(STOP_STRINGS),
        # Recommended sampling: at temperature 1 this small model drifts out of domain.
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=420)
    args = parser.parse_args()
    setup_torch()

    corpus.write_splits()  # tenant train/held-out files (deterministic)
    docs = corpus.general_documents(N_GENERAL, seed=SEED)
    for tenant in corpus.TENANT_NAMES:
        docs += corpus.tenant_dialogues(tenant, "base", N_PER_TENANT)

    t0 = time.time()
    tok = build_tokenizer(docs)
    seqs = encode(tok, docs)
    n_tokens = sum(map(len, seqs))
    print(
        f"tokenizer: {len(tok)} tokens; corpus: {len(docs)} docs, {n_tokens:,} tokens "
        f"({time.time() - t0:.0f}s)"
    )

    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **ARCH,
    )
    model = LlamaForCausalLM(config)
    print(
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{args.steps} steps x {BATCH * SEQ_LEN} tokens "
        f"({args.steps * BATCH * SEQ_LEN / n_tokens:.2f} epochs)"
    )
    batches = packed_batches(seqs, BATCH, SEQ_LEN, random.Random(SEED))
    seconds = train_loop(model, batches, args.steps, lr=2e-3, warmup=30, weight_decay=0.1)
    print(f"trained in {seconds / 60:.1f} min")

    model.generation_config = generation_config(tok)
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(BASE_DIR)
    # transformers 5 no longer writes the name; keep it in config.json for tools that read it.
    config_json = json.loads((BASE_DIR / "config.json").read_text())
    (BASE_DIR / "config.json").write_text(
        json.dumps({"_name_or_path": MODEL_NAME, **config_json}, indent=2) + "\n"
    )
    tok.save_pretrained(BASE_DIR)
    # "PreTrainedTokenizerFast" loads in transformers 4.x and 5.x ("TokenizersBackend": 5.x only).
    tok_config = json.loads((BASE_DIR / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (BASE_DIR / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    # Record how the weights were made next to them (read by the README / humans).
    (BASE_DIR / "build_info.json").write_text(
        json.dumps(
            {
                "name": MODEL_NAME,
                "steps": args.steps,
                "batch": BATCH,
                "seq_len": SEQ_LEN,
                "train_tokens": args.steps * BATCH * SEQ_LEN,
                "train_minutes": round(seconds / 60, 1),
                "seed": SEED,
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )
    for prompt in (
        "Customer: Where is my order 4821?\nAgent:",
        "Customer: I lost my card.\nAgent:",
        "Customer: Is flight SK 715 on time?\nAgent:",
        "Sam: What is the code?\nMaya: The code is 3907.\nSam:",
        "Sam: What are you doing today?\n",
    ):
        print(repr(prompt), "->", repr(greedy(model, tok, prompt)))


if __name__ == "__main__":
    main()
