"""Sampling, the engine and its output processing, above the model and the tokenizer.

These names are the floor's public face: the server and batch jobs import
only them (and ``opswitch.api``), nothing of the model layer below.
"""

from opswitch.core.ops import log_softmax  # the one stable log-softmax (logprobs, evaluation)
from opswitch.generation.config import MAX_STOP_CHARS, MAX_STOPS, GenerationConfig
from opswitch.generation.engine import DEFAULT_PREFILL_CHUNK, Engine, Generation, StepOutput
from opswitch.generation.loop import GenerationResult, check_request
from opswitch.generation.output import OutputProcessor, TextStops, token_logprobs
from opswitch.generation.run import (
    BatchGenerator,
    generate_batch,
    generate_ids,
    run_batch,
    run_stream,
    stream_ids,
    stream_outputs,
)
from opswitch.generation.sampling import sample_next

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "BatchGenerator",
    "Engine",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "OutputProcessor",
    "StepOutput",
    "TextStops",
    "check_request",
    "generate_batch",
    "generate_ids",
    "log_softmax",
    "run_batch",
    "run_stream",
    "sample_next",
    "stream_ids",
    "stream_outputs",
    "token_logprobs",
]
