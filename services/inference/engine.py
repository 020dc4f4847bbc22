"""The model runner: the base model, with LoRA applied per batch row, one forward pass at a
time.

LoRA is applied by forward hooks on the base model's linear layers (output + scale·x·Aᵀ·Bᵀ,
PEFT's formula), so the base weights are never modified and switching adapters between
requests costs nothing. The engine knows nothing of requests or batches: decoding
(services.inference.decoding) hands it plain tensors and a LoRA batch and gets logits back.
All methods here are synchronous and run on one worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from services.inference.lora import LinearShape, LoraWeights
from services.inference.lora_batch import LoraBatch

log = logging.getLogger(__name__)


@dataclass
class TokenScores:
    token_logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Engine:
    def __init__(self, model_dir: Path, device: str = "auto", dtype: str = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_id = Path(model_dir).name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.architecture = type(self.model).__name__
        self.context_length = int(self.model.config.max_position_embeddings)
        self.logits_size = int(self.model.config.vocab_size)  # the width of the logits
        self.eos_token_id = self.tokenizer.eos_token_id
        # Ids a caller may send: known to the tokenizer and inside the embedding matrix.
        self.vocab_size = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        # No token covers more characters than the vocabulary's longest entry, so a text
        # longer than this cannot fit the context: refused before it is tokenized.
        longest_token = max(len(token) for token in self.tokenizer.get_vocab())
        self.max_text_chars = self.context_length * longest_token
        # Left padding of batched prompts; masked out, so any id works.
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        # Where an assistant turn ends when the model writes on into the next turn; chat
        # requests stop there (the model directory's generation_config.json stop_strings).
        generation = self._generation_config(model_dir)
        self.chat_stop = tuple(generation.stop_strings or ())
        # The model's recommended sampling (set only if its generation_config.json says so),
        # used where a request leaves them unset, as vLLM does.
        recommended = generation.to_diff_dict()
        self.default_temperature: float | None = recommended.get("temperature")
        self.default_top_p: float | None = recommended.get("top_p")
        self.linear_shapes: dict[str, LinearShape] = {}
        self._token_pieces: dict[int, tuple[str, bytes]] = {}
        # A byte-level BPE tokenizer (GPT-2's) spells bytes as printable symbols: the map
        # back to bytes, for tokens' exact bytes.
        self._byte_decoder: dict[str, int] | None = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
            self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._active: LoraBatch | None = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self.linear_shapes[name] = LinearShape(module.in_features, module.out_features)
                module.register_forward_hook(self._lora_hook(name))
        log.info(
            "model loaded",
            extra={"model": self.model_id, "device": str(self.device), "dtype": str(self.dtype)},
        )

    @staticmethod
    def _generation_config(model_dir: Path) -> GenerationConfig:
        try:
            return GenerationConfig.from_pretrained(model_dir)
        except OSError:  # the directory has no generation_config.json
            return GenerationConfig()

    def _lora_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            if self._active is not None:
                self._active.add_to(name, args[0], output)

        return hook

    def lora_batch(self, row_adapters: list[LoraWeights | None]) -> LoraBatch:
        return LoraBatch.build(
            row_adapters, self.linear_shapes, dtype=self.dtype, device=self.device
        )

    @contextmanager
    def applying(self, lora: LoraBatch) -> Iterator[None]:
        """Apply these per-row adapters to forward passes inside the block."""
        self._active = lora
        try:
            yield
        finally:
            self._active = None

    def adapters(self, row_adapters: list[LoraWeights | None]):
        """Apply these adapters, one per batch row, to forward passes inside the block."""
        return self.applying(self.lora_batch(row_adapters))

    # -- tokenization -------------------------------------------------------------------

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens).input_ids

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token as logprobs show it: its text decoded alone, special tokens included
        (as vLLM's), and its exact UTF-8 bytes (part of a character, for a byte-level
        tokenizer's token that splits one, where the text shows U+FFFD)."""
        piece = self._token_pieces.get(token_id)
        if piece is None:
            text = self.tokenizer.decode([token_id])
            raw = text.encode()
            if self._byte_decoder and token_id not in self.tokenizer.all_special_ids:
                symbols = self.tokenizer.convert_ids_to_tokens(token_id)
                if all(c in self._byte_decoder for c in symbols):
                    raw = bytes(self._byte_decoder[c] for c in symbols)
            piece = self._token_pieces[token_id] = (text, raw)
        return piece

    def token_strings(self, tokens: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(tokens)

    def render_chat(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    # -- model calls ----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        lora: LoraBatch,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass: each row's logits for its last position (every position when
        `all_positions`), and the KV cache (a new one when `cache` is None, else `cache`
        extended by these positions)."""
        with self.applying(lora):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if all_positions else 1,
            )
        return (out.logits if all_positions else out.logits[:, -1]), out.cache

    @torch.inference_mode()
    def score(
        self, prompt_ids: list[int], completions: list[list[int]], adapter: LoraWeights | None
    ) -> list[TokenScores]:
        """Log-probabilities of each completion's tokens given the prompt."""
        with self.adapters([adapter]):
            results = []
            for completion in completions:
                ids = torch.tensor([prompt_ids + completion], device=self.device)
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
                # Token t is predicted by position t-1.
                positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
                chosen = logp[positions, ids[0, len(prompt_ids) :]]
                results.append(TokenScores(token_logprobs=chosen.tolist()))
            return results

    @torch.inference_mode()
    def embed(self, texts_ids: list[list[int]], adapter: LoraWeights | None) -> torch.Tensor:
        """One unit-length vector per token sequence: the attention-masked mean over its
        tokens of the last hidden state (after the final norm), float32 [n, hidden_size].
        The sequences run as one batch, right-padded (causal attention: real tokens never
        see the padding after them, and their positions start at 0 as unbatched)."""
        longest = max(len(ids) for ids in texts_ids)
        ids = torch.full((len(texts_ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts_ids), longest), dtype=torch.long)
        for row, seq in enumerate(texts_ids):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with self.adapters([adapter] * len(texts_ids)):
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask)
        weights = mask.unsqueeze(-1).to(torch.float32)
        summed = (hidden.last_hidden_state.float() * weights).sum(dim=1)
        mean = summed / weights.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1).cpu()
