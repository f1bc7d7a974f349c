"""Turning one position's logits into the next token id.

Done on the host in float64: a vocabulary-sized vector is cheap, and
doing it in one precision everywhere makes a seed give the same text on
every backend whose logits agree.
"""

from __future__ import annotations

import numpy as np

from opswitch.core.errors import NonFiniteLogitsError
from opswitch.generation.config import GenerationConfig


def sample_next(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling.

    Works on the candidate ids only once top-k has cut the vocabulary down,
    so a step costs a partition of the logits, not a sort of all of them.
    """
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max()  # NaN anywhere makes it NaN; -inf alone (masked ids) is fine
    if not np.isfinite(top):
        raise NonFiniteLogitsError(
            f"the model produced {_describe(top)} logits: the weights hold non-finite values, "
            "or values so large that the forward pass overflows; check the model's weights"
        )
    if config.greedy:
        return int(np.argmax(logits))
    # Subtract the max before dividing: (logits - top) <= 0, so no temperature, however
    # small, can overflow it (logits / 1e-320 would be inf, and inf - inf NaN).
    scaled = (logits - top) / config.temperature
    if 0 < config.top_k < scaled.size:  # keep the k largest; ties at the edge stay in
        kth = scaled[np.argpartition(scaled, -config.top_k)[-config.top_k]]
        ids = np.flatnonzero(scaled >= kth)
    else:
        ids = np.arange(scaled.size)
    probs = np.exp(scaled[ids] - scaled[ids].max())
    probs /= probs.sum()
    if 0 < config.top_p < 1:  # nucleus: the smallest set whose mass reaches top_p
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), config.top_p)) + 1]
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return int(ids[rng.choice(ids.size, p=probs)])


def _describe(top: float) -> str:
    if np.isnan(top):
        return "NaN"
    return "infinite" if top > 0 else "only -inf"
