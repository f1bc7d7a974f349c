"""Generation settings, with the seed CLI's defaults and one place to validate them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from opswitch.core.errors import GenerationError

DEFAULT_STOP = "eos"  # the model's end-of-text token, <|endoftext|> for GPT-2
# Temperatures below this are greedy.  At 1e-4 a token needs a logit within ~1e-3 of
# the best to get even a 1e-4 chance, and 1e-3 is the size of the float32 rounding
# differences between backends: below it, sampling would only pick among near-ties
# by backend noise, so greedy is the same text, reproducible, and cannot overflow.
MIN_TEMPERATURE = 1e-4
MAX_STOPS = 4  # stop strings per request, as OpenAI's API
# a stop string is looked for in the text after every token: longer than any text a
# context can hold, it could never match, only slow every step
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how to sample it.

    temperature 0 (or anything below MIN_TEMPERATURE) is greedy; top_k 0 and top_p 0 or 1 switch those filters
    off; stop_token -1 means never stop early, ``"eos"`` the model's own.  ``stop``: texts
    that end the output where they first appear (not included); a string is one of them.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    seed: int | None = None
    stop_token: int | str = DEFAULT_STOP
    use_kv_cache: bool = True
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, minimum=0)
        _int("top_k", self.top_k, minimum=0)
        if not _is_number(self.temperature) or not self.temperature >= 0 or math.isinf(self.temperature):
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 = greedy, as is anything below "
                f"{MIN_TEMPERATURE:g}), got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise GenerationError(f"top_p must be between 0 and 1 (0 or 1 = off), got {self.top_p!r}")
        if self.seed is not None:
            _int("seed", self.seed, minimum=0)
        if self.stop_token != DEFAULT_STOP:
            _int("stop_token", self.stop_token, minimum=-1)
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOPS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise GenerationError(
                f"stop must be a non-empty text of at most {MAX_STOP_CHARS} characters, or a list of at"
                f" most {MAX_STOPS} of them, got {_short(self.stop)}"
            )

    def replace(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GenerationError(f"{name} must be an integer >= {minimum}, got {value!r}")
