"""Random-init Hugging Face GPT-2s for parity tests (imported by test_eval and test_onnx).

Biases and layernorm gains are perturbed away from HF's 0 / 1 init, as in
test_parity.py, so that a dropped bias or gain cannot hide (and an exporter
cannot fold them away or share one initializer between them).
"""

from __future__ import annotations

from pathlib import Path


def perturbed_hf_model(seed: int = 0, **shape):
    import torch
    import transformers

    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0, **shape}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, initializer_range=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif ".ln_" in name or "ln_f" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        if not model.config.tie_word_embeddings:  # an lm_head of its own, unlike the embedding
            model.lm_head.weight.normal_(0.0, 0.1)
            assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
        if model.config.layer_norm_epsilon < 1e-5:  # small-variance rows, where epsilon matters
            model.transformer.h[0].mlp.c_proj.weight.mul_(1e-3)
            model.transformer.wpe.weight.mul_(1e-3)
            model.transformer.wte.weight.mul_(1e-3)
    return model


def save(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory
