"""OpenAI's completions API: checking a request, shaping responses and errors.

Checks are strict in the way OpenAI's are (an unknown argument is refused,
not ignored), so a client's mistake is a 400 naming the argument rather
than a silently different completion.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opswitch.core.errors import GenerationError, OpswitchError, TokenizerError
from opswitch.generation import MAX_STOP_CHARS, MAX_STOPS, GenerationConfig
from opswitch.serve.scheduler import Delta, Scheduler, SequenceSpec

if TYPE_CHECKING:
    from opswitch.api import LanguageModel, Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 128
MAX_LOGPROBS = 5

SUPPORTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
             "stream_options", "logprobs", "stop", "seed", "user"}
# OpenAI's own arguments we take only at their neutral value (anything else is a 400, never ignored)
NEUTRAL: dict[str, tuple[Any, ...]] = {"echo": (None, False), "suffix": (None,), "best_of": (None, 1),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


class APIError(OpswitchError):
    """An error answered as OpenAI does: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class CompletionRequest:
    """A checked request: one SequenceSpec per choice, in OpenAI's choice order."""

    model: str
    sequences: list[SequenceSpec]
    n_prompts: int
    prompt_tokens: int
    stream: bool
    include_usage: bool
    logprobs: int | None


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {type(value).__name__}", name, "invalid_type")
    if math.isnan(value) or value > high or value < low or (low_open and value == low):
        lo = "(" if low_open else "["
        raise bad(f"{name} must be in {lo}{low:g}, {high:g}], got {value!r}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {type(value).__name__} {value!r}"[:200], name,
                  "invalid_type")
    if not low <= value <= high:
        raise bad(f"{name} must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def _prompts(value: Any, lm: LanguageModel, n: int, max_queue: int) -> list[list[int]]:
    """Text, a list of texts, token ids, or a list of token-id lists -> token ids per prompt.

    Prompts times ``n`` at most ``max_queue``, counted before any prompt is encoded; each text is encoded
    with the context as its bound, so a huge prompt costs about a context's worth
    of work before it is refused, not the work of all of it."""
    n_vocab, n_ctx = lm.config.vocab_size, lm.config.n_positions

    def ids(x: list) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            raise bad("prompt must be a string, a list of strings, a list of token ids or a list of"
                      " lists of token ids", "prompt", "invalid_type")
        bad_ids = [t for t in x if not 0 <= t < n_vocab]
        if bad_ids:
            raise bad(f"token id {bad_ids[0]} in prompt is outside the vocabulary (0..{n_vocab - 1})",
                      "prompt", "invalid_value")
        return list(x)

    def text(x: str) -> list[int]:
        if x == "":  # as OpenAI's GPT models: an empty prompt starts after <|endoftext|>
            eos = lm.config.eos_token_id
            return [eos] if eos is not None else []
        try:
            return lm.encode_prompt(x)
        except GenerationError:  # more tokens than the context holds: found before encoding it all
            raise bad(f"This model's maximum context length is {n_ctx} tokens, however your prompt is"
                      f" longer than that. Please reduce your prompt.", "prompt",
                      "context_length_exceeded") from None
        except TokenizerError as exc:  # e.g. a lone surrogate, which is not text
            raise bad(f"the prompt cannot be encoded: {exc}"[:300], "prompt", "invalid_value") from None

    if value is None:
        raise bad("you must provide a prompt", "prompt", "missing_required_parameter")
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value) \
            and len(value) * n > max_queue:
        raise bad(f"this request asks for {len(value) * n} completions ({len(value)} prompts, n {n});"
                  f" the server queues at most {max_queue} (--max-queue)", "prompt", "invalid_value")
    if isinstance(value, str):
        prompts = [text(value)]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = [text(p) for p in value]
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = [ids(p) for p in value]
    elif isinstance(value, list):
        prompts = [ids(value)]
    else:
        raise bad(f"prompt must be a string or a list, got {type(value).__name__}", "prompt", "invalid_type")
    if any(not p for p in prompts):
        raise bad("the prompt is empty: give at least one token", "prompt", "invalid_value")
    return prompts


def parse_completion(body: Any, lm: LanguageModel, model_name: str,
                     scheduler: Scheduler) -> CompletionRequest:
    """Check a /v1/completions body against OpenAI's rules and this model; APIError if it breaks one."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                raise bad(f"{key} is not supported by this server", key, "unsupported_parameter")
        elif key not in SUPPORTED:
            raise bad(f"Unrecognized request argument supplied: {key}", key, "unrecognized_argument")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter (a string; see GET /v1/models)", "model",
                  "missing_required_parameter")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist: this server serves `{model_name}`",
                       "model", "model_not_found")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options is {\"include_usage\": bool}, and only with stream: true",
                  "stream_options", "invalid_value")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k: int = _integer(body, "top_k", 0, -1, 2**31 - 1)  # type: ignore[assignment]  # an int default gives an int
    n: int = _integer(body, "n", 1, 1, MAX_N)  # type: ignore[assignment]
    seed = _integer(body, "seed", None, 0, 2**63 - 1 - MAX_N)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", None, 1, 2**31 - 1)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user", "invalid_type")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                             or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise bad(f"stop must be a non-empty string of at most {MAX_STOP_CHARS} characters, or a list of"
                  f" at most {MAX_STOPS} of them", "stop",
                  "invalid_value")
    prompts = _prompts(body.get("prompt"), lm, n, scheduler.max_queue)
    if len(prompts) * n > scheduler.max_queue:
        raise bad(f"this request asks for {len(prompts) * n} completions; the server queues at most"
                  f" {scheduler.max_queue} (--max-queue)", "n", "invalid_value")
    n_ctx = lm.config.n_positions
    sequences = []
    for ids in prompts:
        tokens = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, n_ctx - len(ids))
        if len(ids) + max(tokens, 1) > n_ctx:
            raise bad(
                f"This model's maximum context length is {n_ctx} tokens, however you requested"
                f" {len(ids) + max(tokens, 1)} tokens ({len(ids)} in your prompt; {max(tokens, 1)} for the"
                " completion). Please reduce your prompt or completion length.",
                "max_tokens" if max_tokens is not None and len(ids) < n_ctx else "prompt",
                "context_length_exceeded",
            )
        if not scheduler.fits(len(ids), tokens):
            raise bad(f"a sequence of {len(ids) + tokens} tokens needs more KV cache than the server's"
                      " budget (--cache-mib)", "max_tokens", "invalid_value")
        for j in range(n):
            config = GenerationConfig(max_new_tokens=tokens, temperature=temperature, top_k=max(top_k, 0),
                                      top_p=top_p, seed=None if seed is None else seed + j,
                                      stop=tuple(stop or ()))
            sequences.append(SequenceSpec(ids, config, logprobs))
    return CompletionRequest(model, sequences, len(prompts), sum(map(len, prompts)), bool(stream),
                             bool((options or {}).get("include_usage")), logprobs)


# -- responses -----------------------------------------------------------------
def completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def logprobs_json(delta: Delta, tokenizer: Tokenizer, offset: int) -> dict | None:
    """OpenAI's legacy logprobs object for the tokens of ``delta``."""
    if not delta.tokens or not delta.logprobs:
        return None
    tokens = [tokenizer.decode([t]) for t in delta.tokens]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in delta.logprobs],
        "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in top.items()} for _, top in delta.logprobs],
        "text_offset": offsets,
    }


def completion_json(cid: str, model: str, choices: list[dict], usage: dict | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
