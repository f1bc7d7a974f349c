"""Sampling and the generation loop, above the model and the tokenizer."""

from opswitch.core.ops import log_softmax  # the one stable log-softmax (logprobs, evaluation)
from opswitch.generation.config import GenerationConfig
from opswitch.generation.loop import (
    BatchGenerator,
    GenerationResult,
    check_request,
    generate_batch,
    generate_ids,
    stream_ids,
)
from opswitch.generation.sampling import sample_next

__all__ = [
    "BatchGenerator",
    "GenerationConfig",
    "GenerationResult",
    "check_request",
    "generate_batch",
    "generate_ids",
    "log_softmax",
    "sample_next",
    "stream_ids",
]
