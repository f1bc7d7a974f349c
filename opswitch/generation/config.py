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


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how to sample it.

    temperature 0 (or anything below MIN_TEMPERATURE) is greedy; top_k 0 and top_p 0 or 1 switch those filters
    off; stop_token -1 means never stop early, ``"eos"`` the model's own.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    seed: int | None = None
    stop_token: int | str = DEFAULT_STOP
    use_kv_cache: bool = True

    def __post_init__(self) -> None:
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

    def replace(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GenerationError(f"{name} must be an integer >= {minimum}, got {value!r}")
