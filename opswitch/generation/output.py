"""Output processing: token ids to text, stop strings, logprobs, in one place.

Every entry point (``generate``, ``serve``, ``batch``) gets its text from
here, so the same request and seed give the same text in all three.  Text
is decoded incrementally: bytes of a character split across tokens are held
back until it is complete, and so is text that could be the start of a stop
string, until the next tokens say whether it is one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from opswitch.core.ops import log_softmax


class StreamDecoder(Protocol):
    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


class HasStreamDecoder(Protocol):
    """What the engine needs of a tokenizer."""

    def stream_decoder(self) -> StreamDecoder: ...


class TextStops:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class OutputProcessor:
    """One sequence's text so far: ``push`` each new token, ``finish`` at the end.

    Without a decoder (a model without a tokenizer) there is no text and no stop strings."""

    def __init__(self, decoder: StreamDecoder | None, stops: tuple[str, ...] = ()) -> None:
        self.decoder = decoder
        self.stops = TextStops(stops)
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to show, and whether it reached a stop string."""
        if self.decoder is None:
            return "", False
        text, hit = self.stops.push(self.decoder.push(token))
        self.text += text
        return text, hit

    def finish(self) -> tuple[str, bool]:
        """What the decoder and the stop check held back, at the end of a sequence that did
        not stop at a stop string (the held text may complete one: then it is cut there)."""
        if self.decoder is None:
            return "", False
        tail, hit = self.stops.push(self.decoder.flush())
        text = tail if hit else tail + self.stops.flush()
        self.text += text
        return text, hit


def token_logprobs(logits: np.ndarray | None, token: int, top: int) -> tuple[float, dict[int, float]]:
    """The chosen token's log-probability under the model, and the ``top`` likeliest."""
    if logits is None:
        return float("nan"), {}
    lp = log_softmax(logits)
    candidates = np.argpartition(-lp, top)[:top] if 0 < top < lp.size else np.arange(lp.size if top else 0)
    best = sorted(candidates, key=lambda i: -lp[i])
    return float(lp[token]), {int(i): float(lp[i]) for i in best}
