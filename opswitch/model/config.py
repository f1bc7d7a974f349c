"""GPT-2 hyperparameters, read from and written as Hugging Face ``config.json``.

The config is the contract between a checkpoint and the forward pass: every
tensor shape follows from it (``param_shapes``), so it is validated as soon
as it is read, with errors that name the file and the key to fix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from opswitch.core.errors import ConfigError, OpswitchWarning, shown
from opswitch.core.files import CONFIG_LIMIT, read_json

# Both names mean the tanh approximation of GELU; HF's plain "gelu" is the erf one.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

# Older GPT-2 configs (and HF's attribute_map) spell some keys differently.
_ALIASES = {
    "n_positions": ("n_ctx", "max_position_embeddings"),
    "n_embd": ("hidden_size",),
    "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",),
}
_REQUIRED = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")

# HF options that change the maths of the forward pass we implement: refuse
# them rather than silently computing something else.  (key, value HF uses)
_UNSUPPORTED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


@dataclass(frozen=True)
class GPT2Config:
    """Shape and numerics of a GPT-2 model, named as in HF's ``GPT2Config``."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # None means 4 * n_embd, as in HF
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        _validate(asdict(self), "GPT2Config")

    @property
    def d_ff(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape, named as in the checkpoint (``h.0.attn.c_attn.weight``).

        HF's GPT-2 uses Conv1D, so linear weights are stored ``[in, out]``.
        ``lm_head.weight`` appears only when the embeddings are untied.
        """
        e, f = self.n_embd, self.d_ff
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab_size, e),
            "wpe.weight": (self.n_positions, e),
        }
        for i in range(self.n_layer):
            p = f"h.{i}."
            shapes.update({
                p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
                p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,),
                p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
                p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
                p + "mlp.c_fc.weight": (e, f), p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, e), p + "mlp.c_proj.bias": (e,),
            })
        shapes["ln_f.weight"] = (e,)
        shapes["ln_f.bias"] = (e,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, e)
        return shapes

    @property
    def n_params(self) -> int:
        """Number of unique parameters (a tied embedding counts once)."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> GPT2Config:
        """Read an HF ``config.json`` dict; ``source`` names it in error messages."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, not {type(d).__name__}; fix the config")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(
                f"{source}: model_type is {shown(model_type)}, but opswitch only runs GPT-2 models "
                "(model_type 'gpt2')"
            )
        for key, hf_default in _UNSUPPORTED.items():
            if d.get(key, hf_default) != hf_default:
                raise ConfigError(
                    f"{source}: {key}={shown(d[key])} is not supported (opswitch implements the standard "
                    f"GPT-2 attention, {key}={hf_default!r}); use a model without this option"
                )
        values: dict[str, Any] = {}
        for name in _REQUIRED:
            found = next((k for k in (name, *_ALIASES.get(name, ())) if k in d), None)
            if found is None:
                raise ConfigError(f"{source}: missing key {name!r}; add it (see any GPT-2 config.json)")
            values[name] = d[found]
        for name in ("n_inner", "layer_norm_epsilon", "activation_function",
                     "bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if name in d:
                values[name] = d[name]
        _validate({**_DEFAULTS, **values}, source)
        eos, n_vocab = values.get("eos_token_id"), values["vocab_size"]
        if eos is not None and eos >= n_vocab:
            # A warning, not an error: the model still runs (transformers loads it too),
            # it only never stops early, which the user should hear about once.
            warnings.warn(OpswitchWarning(
                f"{source}: eos_token_id={eos} is outside the vocabulary (vocab_size={n_vocab}), "
                "so generation never stops at an end-of-text token; set eos_token_id to the model's "
                "end-of-text id, or to null"
            ), stacklevel=2)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> GPT2Config:
        """Read ``config.json``; a missing or unparsable file is a ConfigError naming it."""
        d = read_json(
            path, what="config", limit=CONFIG_LIMIT, error=ConfigError,
            missing="a model needs the config.json it was saved with",
        )
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """An HF-loadable ``config.json`` dict (``GPT2LMHeadModel.from_pretrained`` accepts it).

        An eos_token_id outside the vocabulary (the GPT-2 default with a small
        vocabulary) is written as null: the model has no end-of-text token.
        """
        d = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **asdict(self)}
        if self.eos_token_id is not None and self.eos_token_id >= self.vocab_size:
            d["eos_token_id"] = None
        return d


_DEFAULTS = {f.name: f.default for f in fields(GPT2Config) if f.default is not MISSING}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(v: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError for the first bad field; the messages name ``source`` and the key."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={shown(v[key])} {why}; fix the config")

    for key in _REQUIRED:
        if not _is_int(v[key]) or v[key] <= 0:
            raise bad(key, "must be a positive integer")
    if v["n_inner"] is not None and (not _is_int(v["n_inner"]) or v["n_inner"] <= 0):
        raise bad("n_inner", "must be a positive integer or null (null means 4 * n_embd)")
    eps = v["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise bad("layer_norm_epsilon", "must be a positive number")
    if v["activation_function"] not in TANH_GELUS:
        raise bad("activation_function", f"is not supported: only the tanh GELU ({', '.join(TANH_GELUS)}) is")
    for key in ("bos_token_id", "eos_token_id"):
        if v[key] is not None and (not _is_int(v[key]) or v[key] < 0):
            raise bad(key, "must be a non-negative integer or null")
    if not isinstance(v["tie_word_embeddings"], bool):
        raise bad("tie_word_embeddings", "must be true or false")
    if v["n_embd"] % v["n_head"]:
        raise ConfigError(
            f"{source}: n_embd={v['n_embd']} is not divisible by n_head={v['n_head']}; fix the config"
        )


def _preset(n_layer: int, n_embd: int, n_head: int) -> GPT2Config:
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head)


# The published OpenAI GPT-2 sizes (and DistilGPT2: gpt2-small width, 6 layers).
PRESETS: dict[str, GPT2Config] = {
    "gpt2": _preset(12, 768, 12),
    "gpt2-medium": _preset(24, 1024, 16),
    "gpt2-large": _preset(36, 1280, 20),
    "gpt2-xl": _preset(48, 1600, 25),
    "distilgpt2": _preset(6, 768, 12),
}
