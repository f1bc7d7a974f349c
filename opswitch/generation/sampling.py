"""Turning one position's logits into the next token id.

Done on the host in float64: a vocabulary-sized vector is cheap, and
doing it in one precision everywhere makes a seed give the same text on
every backend whose logits agree.
"""

from __future__ import annotations

import numpy as np

from opswitch.generation.config import GenerationConfig


def sample_next(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if config.greedy:
        return int(np.argmax(logits))
    scaled = logits / config.temperature
    if 0 < config.top_k < scaled.size:  # keep the k largest (ties at the edge stay in)
        kth = np.partition(scaled, -config.top_k)[-config.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if 0 < config.top_p < 1:  # nucleus: the smallest set whose mass reaches top_p
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        nucleus = np.zeros_like(probs)
        nucleus[keep] = probs[keep]
        probs = nucleus / nucleus.sum()
    return int(rng.choice(probs.size, p=probs))
