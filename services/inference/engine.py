"""The model runner: base model + LoRA applied per request, decoding with a KV cache.

LoRA is applied by forward hooks on the base model's linear layers (output + scale·x·Aᵀ·Bᵀ,
PEFT's formula), so the base weights are never modified and switching adapters between
requests costs nothing. All methods here are synchronous and run on one worker thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from services.inference.lora import LinearShape, LoraWeights
from services.inference.lora_batch import LoraBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0

    @property
    def mean_token_entropy(self) -> float:
        return (
            sum(self.token_entropies) / len(self.token_entropies) if self.token_entropies else 0.0
        )

    @property
    def mean_logprob(self) -> float:
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else 0.0

    @property
    def min_token_prob(self) -> float:
        return math.exp(min(self.token_logprobs)) if self.token_logprobs else 0.0


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


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Greedy at temperature 0; else temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


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
        self.eos_token_id = self.tokenizer.eos_token_id
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
            batch = self._active
            delta = batch.delta(name, args[0]) if batch is not None else None
            return None if delta is None else output + delta.to(output.dtype)

        return hook

    def lora_batch(self, row_adapters: list[LoraWeights | None]) -> LoraBatch | None:
        if all(a is None for a in row_adapters):
            return None
        return LoraBatch(row_adapters, self.linear_shapes, dtype=self.dtype, device=self.device)

    @contextmanager
    def adapters(self, row_adapters: list[LoraWeights | None]) -> Iterator[None]:
        """Apply these adapters, one per batch row, to forward passes inside the block."""
        self._active = self.lora_batch(row_adapters)
        try:
            yield
        finally:
            self._active = None

    # -- tokenization -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    # -- model calls ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], adapter: LoraWeights | None, config: SamplingConfig
    ) -> Generation:
        started = time.perf_counter()
        generator = torch.Generator()
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
        with self.adapters([adapter]):
            ids = torch.tensor([prompt_ids], device=self.device)
            cache = None
            tokens: list[int] = []
            logprobs: list[float] = []
            entropies: list[float] = []
            text, finish, first_token_at = "", "length", 0.0
            longest_stop = max((len(s) for s in config.stop), default=0)
            for _ in range(config.max_new_tokens):
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                logits = out.logits[0, -1].float()
                # Uncertainty is measured on the model's own distribution, whatever the
                # sampling settings, so scores are comparable across requests.
                logp = torch.log_softmax(logits, dim=-1)
                token = sample_token(logits, config.temperature, config.top_p, generator)
                if not tokens:
                    first_token_at = time.perf_counter() - started
                logprobs.append(float(logp[token]))
                entropies.append(float(-(logp.exp() * logp).sum()))
                if token == self.eos_token_id:
                    finish = "stop"
                    break
                tokens.append(token)
                previous = len(text)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = self._find_stop(text, config.stop, max(0, previous - longest_stop))
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                ids = torch.tensor([[token]], device=self.device)
        return Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(logprobs),
            token_logprobs=logprobs,
            token_entropies=entropies,
            time_to_first_token=first_token_at,
            total_seconds=time.perf_counter() - started,
        )

    @staticmethod
    def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
        hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        return min(hits) if hits else None

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
