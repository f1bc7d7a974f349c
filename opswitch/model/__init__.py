"""The model layer: config, weights I/O, the GPT-2 forward pass, hub resolution."""
