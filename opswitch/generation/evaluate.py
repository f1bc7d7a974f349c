"""Loss and perplexity of a model on a text, by Hugging Face's sliding-window method.

A text longer than the context is scored in windows of ``n_positions``
tokens that start every ``stride`` tokens, and each window scores only the
tokens the previous windows did not reach (HF's guide "Perplexity of
fixed-length models").  With ``stride == n_positions`` the windows are
disjoint: cheapest, and the first token of each window goes unscored, as it
has no context inside its window; a smaller stride gives every scored token
at least ``n_positions - stride`` tokens of context, at more compute.

Each window's loss is the backend's ``cross_entropy`` op: a float64-accumulated
sum over the scored tokens, so windows add up exactly, and the mean over all
scored tokens is what HF's recipe computes (weighting each window's mean by
the number of tokens it really scored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from opswitch.core.errors import GenerationError


@dataclass(frozen=True)
class Window:
    """Tokens ``begin:end`` go in; tokens ``first:end`` are scored."""

    begin: int
    end: int
    first: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """HF's windows: start every ``stride`` tokens, ``context`` long, score what is new."""
    if not 1 <= stride <= context:
        raise GenerationError(f"the stride must be between 1 and the context ({context}), not {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context in it
        if end > first:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class Evaluation:
    """Summed loss over the scored tokens; the figures people quote follow from it."""

    nll: float = 0.0  # nats, summed
    tokens: int = 0  # tokens scored
    windows: list[Window] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """Mean cross-entropy, nats/token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def bits_per_byte(self, n_bytes: int) -> float:
        """Summed loss in bits over the UTF-8 bytes the scored tokens stand for."""
        return self.nll / math.log(2) / n_bytes if n_bytes else math.nan

    def scored_ids(self, ids: Sequence[int]) -> list[int]:
        return [int(t) for w in self.windows for t in ids[w.first : w.end]]


def window_nll(model, ids: np.ndarray, window: Window) -> float:
    """Summed loss (nats) of the window's scored tokens, by the backend's ``cross_entropy``
    (the window's logits never leave the backend)."""
    return model.nll(ids[window.begin : window.end], window.first - window.begin)


def evaluate(
    model,
    ids: Sequence[int] | np.ndarray,
    *,
    stride: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score ``ids`` with ``model`` (a bound ``GPT2``) in sliding windows.

    ``stride`` defaults to the context (disjoint windows); ``on_window(done,
    total)`` is called after each window, for progress bars.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        raise GenerationError("the text is too short: scoring needs at least two tokens")
    context = model.config.n_positions
    windows = sliding_windows(ids.size, context, context if stride is None else stride)
    result = Evaluation(windows=windows)
    for i, window in enumerate(windows):
        result.nll += window_nll(model, ids, window)
        result.tokens += window.n_scored
        if on_window is not None:
            on_window(i + 1, len(windows))
    return result
