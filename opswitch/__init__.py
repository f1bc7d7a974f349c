"""opswitch: run GPT-2-family language models on any compute backend."""

__version__ = "0.1.0"
