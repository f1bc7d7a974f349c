"""``opswitch batch generate|eval``: a dataset in, one output row per input row out.

A thin shell over ``opswitch.batch``: flags to a ``JobSpec``, and a
``Report`` that prints what happens to stderr (a progress bar with rows/s
and ETA when stderr is a terminal).  Ctrl-C keeps the complete shards and
says how to resume (exit 130).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from opswitch.batch import JobSpec, RayOptions, Task, generation_settings, run_job
from opswitch.batch.job import Report
from opswitch.batch.ray_runner import actor_threads
from opswitch.cli.allocator import return_large_blocks_to_the_os
from opswitch.cli.model_args import add_engine_arguments, add_model_arguments
from opswitch.cli.parsing import OneLineParser, UsageError
from opswitch.cli.progress import Progress

if TYPE_CHECKING:
    from opswitch.api import LanguageModel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="generate or score over a dataset (JSON Lines or Parquet), locally or on Ray",
        description="Run a model over every row of a dataset: `batch generate` continues each prompt, "
        "`batch eval` scores each text (loss, perplexity). Output rows keep the input's fields, in "
        "input order; bad rows go to OUTPUT's .errors.jsonl. Output is written in shards, so "
        "--resume finishes an interrupted job.",
    )
    jobs = p.add_subparsers(dest="job", metavar="JOB", parser_class=OneLineParser)
    gen = jobs.add_parser("generate", help="generate a completion for each prompt",
                          description="Generate a completion for each row's prompt; a row's `stop`"
                          " field (a text or a list of up to 4) ends its completion where one first"
                          " appears.")
    _common(gen, field_flag="--prompt-field", field_default="prompt")
    gen.add_argument("--max-tokens", type=int, default=100, metavar="N", help="tokens per row (default 100)")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40, metavar="K", help="0 = off (default 40)")
    gen.add_argument("--top-p", type=float, default=0.9, metavar="P", help="0 = off (default 0.9)")
    gen.add_argument("--seed", type=int, metavar="N",
                     help="job seed; each row's seed derives from it and the row's index "
                     "(default: a fresh one, recorded in the output)")
    gen.add_argument("--stop-token", type=int, metavar="ID",
                     help="stop at this token id; -1 = never (default: <|endoftext|>)")
    add_engine_arguments(gen)
    ev = jobs.add_parser("eval", help="score each text: loss, perplexity, tokens",
                         description="Score each row's text: mean next-token loss (nats/token), "
                         "perplexity and token count.")
    _common(ev, field_flag="--text-field", field_default="text")
    p.set_defaults(run=lambda args: _no_job(p))


def _common(p: argparse.ArgumentParser, field_flag: str, field_default: str) -> None:
    add_model_arguments(p)  # --model, --revision, --tokenizer, --backend, --weights, --threads
    p.add_argument("--input", required=True, type=Path, metavar="FILE", help=".jsonl/.ndjson or .parquet")
    p.add_argument("--output", required=True, type=Path, metavar="FILE", help=".jsonl/.ndjson or .parquet")
    p.add_argument(field_flag, dest="field", default=field_default, metavar="NAME",
                   help=f"the input field holding the text (default {field_default!r})")
    p.add_argument("--resume", action="store_true", help="finish an interrupted job from its complete shards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and its shards)")
    p.add_argument("--shard-size", type=int, default=100, metavar="N",
                   help="rows per shard: at most this much work is redone after a crash (default 100)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per model call (default 8)")
    p.add_argument("--cache-mib", type=float, default=1024, metavar="MIB",
                   help="KV-cache memory budget for the rows of one model call, as serve's "
                   "(default 1024; per process, so per actor on Ray); rows beyond it wait their turn")
    p.add_argument("--ray", metavar="auto|local|ADDRESS",
                   help="run on Ray (pip install 'opswitch[ray]'): auto = $RAY_ADDRESS or the cluster "
                   "started on this machine, else a new local one; local = a new local one; "
                   "ADDRESS = that cluster (host:port or ray://host:10001)")
    p.add_argument("--actors", type=int, metavar="N", help="with --ray: model replicas (default 2)")
    p.add_argument("--cpus-per-actor", type=float, metavar="N", help="with --ray: CPUs each (default 1)")
    p.add_argument("--gpus-per-actor", type=float, metavar="N",
                   help="with --ray: GPUs each (default 0; use with --backend cuda)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or summary, only errors")
    p.set_defaults(run=run)


def _no_job(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def spec_from(args: argparse.Namespace):
    """Flags to a JobSpec and RayOptions (or None), every value checked."""

    if args.job == "generate":
        generation = generation_settings(
            max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed,
            stop_token="eos" if args.stop_token is None else args.stop_token,
        )
        engine = {"prefill_chunk": args.prefill_chunk, "prefix_cache": not args.no_prefix_cache}
    else:
        generation, engine = {}, {}
    task = Task(args.job, args.field, model=args.model, backend=args.backend, generation=generation,
                cache_mib=args.cache_mib, tokenizer=args.tokenizer, revision=args.revision,
                weights=args.weights, kv_cache=args.kv_cache, **engine)
    ray_flags = {"actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
                 "gpus_per_actor": args.gpus_per_actor}
    given = {k: v for k, v in ray_flags.items() if v is not None}
    if args.ray is None and given:
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} needs --ray")
    ray = RayOptions(address=args.ray, **given) if args.ray is not None else None
    spec = JobSpec(task, args.input, args.output, shard_size=args.shard_size, batch_size=args.batch_size,
                   resume=args.resume, overwrite=args.overwrite)
    return spec, ray


class CliReport(Report):
    """Prints a job's progress to stderr; a bar only where stderr is a terminal."""

    def __init__(self, quiet: bool, ray) -> None:
        self.quiet, self.ray = quiet, ray
        self.job = None
        self.bar = None
        self.held: list[str] | None = []  # until the model has loaded: a failure stays one line

    def info(self, line: str) -> None:
        if self.quiet:
            return
        if self.held is not None:
            self.held.append(line)
            return
        print(line, file=sys.stderr, flush=True)

    def checked(self, job) -> None:
        self.job = job
        bad = sum(1 for row in job.rows if row.error is not None)
        note = f" ({bad} bad, to be listed in {job.errors_file})" if bad else ""
        self.info(f"Input: {job.spec.input}: {len(job.rows)} rows{note}")

    def loading(self, task):
        return Progress("Loading model")

    def loaded(self, lm: LanguageModel) -> None:
        self.info(f"✓ Model loaded: {lm.source} on backend {lm.backend.name}")

    def running(self, job, n_rows: int) -> None:
        held, self.held = self.held or [], None
        for line in held:
            self.info(line)
        if job.resumed:
            self.info(f"Resuming: {job.resumed} rows in complete shards are done, {job.pending} to go")
        threads = 0 if self.ray is None else actor_threads(self.ray)
        where = "locally" if self.ray is None else (
            f"on Ray ({self.ray.actors} actors, {self.ray.cpus_per_actor:g} CPU"
            + (f", {self.ray.gpus_per_actor:g} GPU" if self.ray.gpus_per_actor else "")
            + f" and {threads} compute thread{'s' if threads > 1 else ''} each)")
        self.info(f"Running {n_rows} rows {where}; shards in {job.shard_dir}")
        if self.ray is not None:
            self.info("note: Ray prints log lines of its own, some marked E (error) that are only notices,"
                      " such as one on actor constructor arguments (ray-project/ray#53727); this job's own"
                      " summary line says whether every row was written")
        if not self.quiet and sys.stderr.isatty() and n_rows:
            self.bar = tqdm(total=n_rows, unit="row", file=sys.stderr, dynamic_ncols=True)

    def done_rows(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(f"note: {line}", file=sys.stderr)
        else:
            self.info(f"note: {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    return_large_blocks_to_the_os()  # a long run's freed caches leave the process

    spec, ray = spec_from(args)
    report = CliReport(args.quiet, ray)
    try:
        summary = run_job(spec, ray=ray, report=report)
    except KeyboardInterrupt:
        report.close()
        job = report.job
        store = job.store if job is not None else None
        if store is not None:
            print(f"\nopswitch: interrupted: {len(store.complete)} of {store.n_shards} shards are complete "
                  f"in {job.shard_dir}; run the same command with --resume to finish", file=sys.stderr)
        else:
            print("\nopswitch: interrupted before any row ran", file=sys.stderr)
        return 130
    finally:
        report.close()
    rate = summary.ran / summary.seconds if summary.seconds > 0 else 0.0
    written = summary.written
    errors = f", {summary.errors} bad rows in {summary.errors_file}" if summary.errors else ", no bad rows"
    report.info(f"✓ {written} rows written to {summary.output}{errors}; "
                f"{summary.ran} rows run in {summary.seconds:.1f}s ({rate:.1f} rows/s)")
    return 0
