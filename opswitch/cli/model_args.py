"""The flags that say which model to load and where: one definition for every command."""

from __future__ import annotations

import argparse
import os

from opswitch.core.backend import ENV_THREADS
from opswitch.core.formats import FORMATS, KV_FORMATS
from opswitch.core.registry import get_registry
from opswitch.generation import DEFAULT_PREFILL_CHUNK


def backend_names() -> str:
    """The registered backends, for --help (what is installed, not what we wish were)."""
    return ", ".join(get_registry().names()) or "none"


def add_model_arguments(p: argparse.ArgumentParser, *, weights: bool = True, tokenizer: bool = True) -> None:
    """--model, --revision, --tokenizer, --backend, --weights and --kv-cache, as ``opswitch.load_model``
    takes them."""
    p.add_argument("--model", metavar="PATH_OR_NAME",
                   help="model directory, weights file, .onnx file or Hugging Face id (gpt2, org/name);"
                   " default: the demo model")
    p.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit) to pin")
    if tokenizer:
        p.add_argument("--tokenizer", metavar="PATH", help="tokenizer files (default: the model's own)")
    p.add_argument("--backend", metavar="SPEC[,SPEC...]",
                   help=f"auto, or NAME[:DEVICE][:DTYPE] with NAME one of {backend_names()}"
                   " (e.g. opencl:1, naive:float64); a comma list tries in order"
                   " (default: $OPSWITCH_BACKEND or auto)")
    if weights:
        p.add_argument("--weights", default=None, choices=FORMATS,
                       help="storage format of the weight matrices on the backend (default: as the file"
                       " stores them: f32, or a GGUF's own types)")
    add_kv_cache_argument(p)
    add_threads_argument(p)


def add_kv_cache_argument(p: argparse.ArgumentParser) -> None:
    """--kv-cache f16 (llama.cpp's default): half the bytes late decode reads."""
    p.add_argument("--kv-cache", default="f32", choices=KV_FORMATS, dest="kv_cache",
                   help="format of the KV cache: f32, or f16 (half the memory and reads; cpu, blas and"
                   " naive backends) (default f32)")


MAX_THREADS = 1024


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags, alike on every command that runs it (serve, batch generate)."""
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="prompts longer than this are prefilled in chunks, one per step, between the"
                   f" running sequences' tokens; 0 = whole prompts at once (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="never reuse the keys and values of a prompt start computed before (reuse never"
                   " changes a result; this is for measuring)")


def thread_count(text: str) -> int:
    """--threads N: a whole number of threads, 1 to MAX_THREADS."""
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count (a whole number, 1-{MAX_THREADS})")
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """--threads N (llama.cpp's -t): the compute threads of every backend's pool."""
    p.add_argument("--threads", "-t", type=thread_count, metavar="N",
                   help=f"compute threads (default: ${ENV_THREADS}, else one per core); shown in the"
                   " backend line")


def apply_threads(args: argparse.Namespace) -> None:
    """Make --threads what every backend reads, before any of them starts a pool."""
    threads = getattr(args, "threads", None)
    if threads:
        os.environ[ENV_THREADS] = str(threads)


def loading_label(args: argparse.Namespace) -> str:
    """What the load progress line says it is doing: reduced formats and ONNX checks take seconds."""
    model = str(getattr(args, "model", None) or "")
    weights = getattr(args, "weights", "f32")
    if model.lower().endswith(".onnx"):
        return "Loading model (reading and checking the ONNX graph)"
    if weights and weights != "f32":
        return f"Loading model (encoding the weights as {weights})"
    return "Loading model"
