"""opswitch: run GPT-2-family language models on any compute backend.

    import opswitch
    lm = opswitch.load_model("path/or/hub-id", backend="auto")
    print(lm.generate("Hello", max_new_tokens=20))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LanguageModel", "__version__", "load_model", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    """Import the model stack on first use, so `opswitch --version` stays instant."""
    if name in ("load_model", "LanguageModel"):
        from opswitch import api

        return getattr(api, name)
    if name == "load_tokenizer":
        from opswitch.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'opswitch' has no attribute {name!r}")
