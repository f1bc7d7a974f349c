"""Train the tiny GPT-2 demo model that ships in ``opswitch/data/demo-model``.

Why this exists: opswitch must generate readable English on a fresh, offline
install, so it needs a small model inside the package, and no pretrained
weights can be downloaded. This script rebuilds that model from scratch, on CPU,
from a public-domain corpus that a package registry serves:

* Corpus: Jane Austen's six novels (1811-1818, public domain, transcribed by
  Project Gutenberg) as shipped by the Debian package ``r-cran-janeaustenr``.
  The package stores them as R objects, so a minimal reader for R's
  serialization format is included below (no R installation needed).
  ``--corpus PATH`` uses your own text instead (a ``.txt`` file or a folder of
  them; ``<|endoftext|>`` inside a file separates documents).
* Tokenizer: GPT-2 style byte-level BPE (``vocab.json`` + ``merges.txt``).
* Model: ``GPT2LMHeadModel``, saved as float16 safetensors to stay a few MB.

Usage: ``python tools/train_demo_model.py --out opswitch/data/demo-model``
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

DEB_NAME = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
EOT = "<|endoftext|>"
# corpus section of MODEL_CARD.md for the default (Debian package) corpus
AUSTEN_CARD = f"""* Source: Debian package `{DEB_NAME}` version `{DEB_VERSION}` (bookworm, section gnu-r).
* Files used from the package: `usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`
  and `Rdata.rdx` (R lazy-load database; read by a small R-serialization reader in
  the training script, no R needed).
* Content: Jane Austen's six novels - Sense and Sensibility (1811), Pride and
  Prejudice (1813), Mansfield Park (1814), Emma (1815), Northanger Abbey and
  Persuasion (1818). The package's help page says: "The UTF-8 plain text was
  sourced from Project Gutenberg".
* Licence: the texts are in the public domain (first published 1811-1818; the
  author died in 1817). The package wrapping them is MIT; its
  `/usr/share/doc/r-cran-janeaustenr/copyright` reads `Copyright: 2016-2017 Julia Silge`
  / `License: MIT` (for `Files: *`).
* Preprocessing: hard-wrapped lines joined into paragraphs, `_italic_` marks
  removed, novels split at chapter headings (one document per chapter).
"""
PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "She was"]


# --------------------------------------------------------------------------- corpus
class _RUnserializer:
    """Read R's XDR serialization (version 2/3) far enough for character vectors.

    R lazy-load databases (``Rdata.rdb``/``.rdx``) hold each object as a zlib
    stream of this format; we only need strings, lists, pairlists and symbols.
    """

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader R versions
        if version == 3:
            encoding_len = self._int()  # then the native encoding's name, skipped
            self.pos += encoding_len

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (241, 242, 253, 254):  # base env, empty env, global env, NULL
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8")
            self.pos += n
            return text
        if kind == 1:  # SYMSXP
            symbol = self.read()
            self.refs.append(symbol)
            return symbol
        if kind == 2:  # pairlist node: [attr] [tag] car cdr
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = (tag, self.read())
            return [head, *(self.read() or [])]
        if kind in (16, 19):  # character vector, generic list
            value: object = [self.read() for _ in range(self._int())]
        elif kind in (10, 13):  # logical, integer
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        else:
            raise ValueError(f"unsupported R SEXP type {kind}")
        attrs = dict(self.read()) if has_attr else {}
        return (value, attrs) if "names" in attrs else value


def read_r_lazyload(base: Path) -> dict[str, object]:
    """Return every object in an R lazy-load database ``base.rdb``/``base.rdx``."""
    top, _ = _RUnserializer(gzip.decompress(base.with_suffix(".rdx").read_bytes())).read()
    offsets, attrs = top[0]  # "variables": named list of (offset, length)
    blob = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (start, length) in zip(attrs["names"], offsets, strict=True):
        # each record: 4-byte big-endian uncompressed size, then a zlib stream
        out[name] = _RUnserializer(zlib.decompress(blob[start + 4 : start + length])).read()
    return out


def fetch_austen(workdir: Path) -> dict[str, list[str]]:
    """Download the pinned Debian package and return {novel: lines}."""
    subprocess.run(["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"], cwd=workdir, check=True)
    (deb,) = workdir.glob(f"{DEB_NAME}_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "x")], check=True)
    rdata = workdir / "x/usr/lib/R/site-library/janeaustenr/data/Rdata"
    return read_r_lazyload(rdata)  # type: ignore[return-value]


def novel_to_chapters(lines: list[str | None]) -> list[str]:
    """Unwrap the 70-column lines into paragraphs and split at chapter headings.

    Chapters become the documents separated by ``<|endoftext|>``; unwrapping
    stops the model from learning Gutenberg's hard line breaks.
    """
    paragraphs, current = [], []
    for line in [*(x or "" for x in lines), ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)).replace("_", ""))
            current = []
    chapters: list[list[str]] = [[]]
    for para in paragraphs:
        if re.fullmatch(r"(CHAPTER|Chapter|VOLUME) [IVXLC\d]+\.?", para):
            chapters.append([])
        else:
            chapters[-1].append(para)
    texts = ["\n\n".join(c) for c in chapters]
    return [t for t in texts if len(t) > 500]  # drops title pages and "THE END"


def load_documents(corpus: Path | None) -> list[str]:
    """Documents (chapters) from ``--corpus`` or from the Debian package."""
    if corpus is not None:
        files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else [corpus]
        docs = [d.strip() for f in files for d in f.read_text("utf-8").split(EOT)]
        return [d for d in docs if d]
    with tempfile.TemporaryDirectory() as tmp:
        novels = fetch_austen(Path(tmp))
    return [ch for name in sorted(novels) for ch in novel_to_chapters(novels[name])]


# ------------------------------------------------------------------- tokenizer/model
def train_tokenizer(train_docs: list[str], vocab_size: int, out: Path) -> GPT2TokenizerFast:
    """Byte-level BPE like GPT-2's, trained on the training split only."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(train_docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    bpe.save_model(str(out))
    return GPT2TokenizerFast.from_pretrained(str(out))


def encode(tok: GPT2TokenizerFast, docs: list[str]) -> torch.Tensor:
    """One token stream, each document followed by ``<|endoftext|>``."""
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def val_loss(model: GPT2LMHeadModel, data: torch.Tensor, ctx: int) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, ctx):
        chunk = data[start : start + ctx + 1]
        logits = model(chunk[:-1].unsqueeze(0)).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    model.train()
    return total / count


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of add-one-smoothed train token frequencies on val: the floor to beat."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[val].mean().item()


def samples(model: GPT2LMHeadModel, tok: GPT2TokenizerFast, seed: int) -> list[tuple[str, str]]:
    """Greedy and nucleus samples per prompt, for the model card."""
    model.eval()
    out = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        torch.manual_seed(seed + i)
        for mode, kw in [
            ("greedy", {"do_sample": False}),
            ("sampled", {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9}),
        ]:
            gen = model.generate(
                ids,
                max_new_tokens=min(60, model.config.n_positions - ids.shape[1]),
                pad_token_id=tok.eos_token_id,
                **kw,
            )
            out.append((f"{mode}: `{prompt}`", tok.decode(gen[0], skip_special_tokens=True)))
    return out


def write_card(args: argparse.Namespace, config: GPT2Config, r: dict) -> None:
    """MODEL_CARD.md: provenance, licence, shape, metrics and samples of this run."""
    sizes = "\n".join(
        f"| `{f.name}` | {f.stat().st_size:,} bytes |"
        for f in sorted(args.out.iterdir())
        if f.name != "MODEL_CARD.md"
    )
    corpus_md = f"* Source: `--corpus {args.corpus}` (user supplied).\n" if args.corpus else AUSTEN_CARD
    sample_md = "\n\n".join(f"**{head}**\n\n> {text.replace(chr(10), ' / ')}" for head, text in r["samples"])
    card = f"""# opswitch demo model (tiny GPT-2, Jane Austen)

A deliberately tiny GPT-2 language model shipped inside opswitch so that
`opswitch generate` produces readable English on an offline install. It is a
demo, not a useful language model: it writes Austen-flavoured pastiche that
drifts off topic within a sentence or two, and knows nothing beyond six novels.

## Corpus

{corpus_md}* Documents: {r["docs"]} joined with
  `<|endoftext|>` ({r["chars"] / 1e6:.2f} M characters). Every 20th document
  (whole documents, contiguous text) is held out for validation: {r["train_tokens"]:,}
  training tokens, {r["val_tokens"]:,} validation tokens.

## Tokenizer and model

* Byte-level BPE (HF `tokenizers`, GPT-2 style, `add_prefix_space=False`),
  vocabulary {config.vocab_size} including `<|endoftext|>` (id {config.eos_token_id}), trained on
  the training split; files `vocab.json` + `merges.txt`.
* `GPT2LMHeadModel`: n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd},
  n_positions={config.n_positions}, tied input/output embeddings, {r["params"]:,} parameters,
  stored as float16 safetensors.

| file | size |
| --- | --- |
{sizes}

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak LR {args.lr}, linear
warmup over the first 5% of steps then cosine decay to 10%, gradient clipping 1.0,
dropout 0.1, batches of {args.batch} random {args.ctx}-token windows, seed {args.seed},
{r["steps"]} steps, {r["train_seconds"] / 60:.1f} minutes on {args.threads} CPU threads (torch
{torch.__version__}).

## Evaluation (validation split, float16 weights as shipped)

| model | cross-entropy (nats/token) | perplexity |
| --- | --- | --- |
| unigram (train token frequencies, add-one) | {r["unigram_nats"]:.3f} | {r["unigram_ppl"]:.1f} |
| this model ({args.ctx}-token windows) | {r["val_nats"]:.3f} | {r["val_ppl"]:.1f} |

The validation chapters ship as `heldout.txt` (each followed by `<|endoftext|>`).
`opswitch eval --text heldout.txt` scores them with Hugging Face's sliding-window
recipe, which leaves each window's first token unscored; the figure above also
scores it, from the previous window's last position.

## Samples

60 new tokens; sampled = temperature 0.8, top-k 40, top-p 0.9, torch seed
{args.seed} + prompt index. Line breaks shown as ` / `.

{sample_md}

## Reproduce

```
apt-get update
python tools/train_demo_model.py --out opswitch/data/demo-model \\
    --steps {args.steps} --seed {args.seed}
```

The script downloads `{DEB_NAME}={DEB_VERSION}` with `apt-get download`; with
`--corpus PATH` it trains on a local text file or folder of `.txt` files instead.
"""
    (args.out / "MODEL_CARD.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("opswitch/data/demo-model"))
    p.add_argument(
        "--corpus",
        type=Path,
        help="text file or folder of .txt files instead of the Debian package",
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="also stop after this wall time (0 = no limit; breaks reproducibility)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--embd", type=int, default=192)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    docs = load_documents(args.corpus)
    # every 20th document (whole chapters, i.e. contiguous blocks) is held out: ~5%
    val_docs = [d for i, d in enumerate(docs) if i % 20 == 10]
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 10]
    # shipped, so that `opswitch eval --text heldout.txt` measures the same chapters
    (args.out / "heldout.txt").write_text("".join(d + EOT for d in val_docs), encoding="utf-8")
    tok = train_tokenizer(train_docs, args.vocab, args.out)
    train, val = encode(tok, train_docs), encode(tok, val_docs)
    print(
        f"{len(docs)} docs, {sum(map(len, docs)) / 1e6:.2f} M chars;",
        f"tokens train {len(train)}, val {len(val)}",
    )

    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.ctx,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        """Linear warmup, then cosine decay to 10% of the peak."""
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    t0, step, running = time.time(), 0, 0.0
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train) - args.ctx, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.ctx] for s in starts.tolist()])
        loss = model(x, labels=x).loss  # HF shifts the labels by one internally
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {running:.3f}  lr {lr_at(step):.2e}",
                f"{time.time() - t0:7.0f}s",
                flush=True,
            )
        if args.minutes and time.time() - t0 > args.minutes * 60:
            print(f"stopping at step {step}: --minutes reached")
            break
    train_s = time.time() - t0

    model.half().save_pretrained(str(args.out), safe_serialization=True)
    # config.json already carries the eos/bos ids; ship only the files we document
    (args.out / "generation_config.json").unlink(missing_ok=True)
    (args.out / "model.safetensors").chmod(0o644)  # written 0600; package data must be readable

    # evaluate exactly what ships: reload the float16 file (upcast to float32 for CPU speed)
    shipped = GPT2LMHeadModel.from_pretrained(str(args.out), dtype=torch.float32)
    tok = GPT2TokenizerFast.from_pretrained(str(args.out))
    assert tok.decode(tok(docs[0][:300])["input_ids"]) == docs[0][:300], "tokenizer round-trip failed"
    loss_val = val_loss(shipped, val, args.ctx)
    loss_uni = unigram_loss(train, val, len(tok))
    gens = samples(shipped, tok, args.seed)
    results = {
        "docs": len(docs),
        "chars": sum(map(len, docs)),
        "params": n_params,
        "steps": step + 1,
        "train_seconds": round(train_s),
        "val_tokens": len(val),
        "train_tokens": len(train),
        "val_nats": loss_val,
        "val_ppl": math.exp(loss_val),
        "unigram_nats": loss_uni,
        "unigram_ppl": math.exp(loss_uni),
        "samples": gens,
    }
    print(json.dumps(results, indent=1))
    write_card(args, config, results)


if __name__ == "__main__":
    main()
