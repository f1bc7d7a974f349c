"""Every error opswitch raises on purpose derives from OpswitchError.

The CLI catches OpswitchError and prints its message as one line (exit 2);
anything else is a bug and exits 1.  Messages say what is wrong *and* what
to do about it, so they must be complete sentences without a traceback.
"""

from __future__ import annotations


class OpswitchError(Exception):
    """Base class: a problem the user can fix (bad input, missing backend)."""


class BackendError(OpswitchError):
    """A backend is unknown, unavailable, or failed while computing."""


class WeightsError(OpswitchError):
    """A weights file or model directory is corrupt, incomplete or unsupported."""


class ConfigError(OpswitchError):
    """A model config is missing, invalid or inconsistent with the weights."""


class TokenizerError(OpswitchError):
    """Tokenizer files are missing or malformed, or an id is out of range."""


class GenerationError(OpswitchError):
    """Invalid generation settings (temperature, top-k, prompt length, ...)."""


class ModelNotFoundError(OpswitchError):
    """A model name or path resolves to nothing locally or on the hub."""


class ModelInputError(OpswitchError):
    """Token ids or positions a model cannot take (not integers, out of range, too many)."""


class TextTooLongError(TokenizerError):
    """A text has more tokens than the caller allows (``encode(text, max_tokens=N)``)."""


class NonFiniteLogitsError(GenerationError):
    """The model produced NaN or infinite logits: no token can be chosen from them."""


class OpswitchWarning(UserWarning):
    """Something works but not as the user likely expects (the CLI prints it as one line)."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for values read from files:
    a 1 MB string in a config must not become a 1 MB error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"
