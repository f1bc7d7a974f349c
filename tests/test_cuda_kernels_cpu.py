"""The cuda backend with its real CUDA kernels, compiled by g++ and run on the CPU.

``tests/cuda_cpu`` builds each ``cuda_kernels/*.cu`` file as the backend hands
it to NVRTC, every CUDA thread a fiber (barriers and warp shuffles among
them); the stand-in CuPy (``tests/cuda_standin.py``) launches them.  So the
kernels' indexing, barriers, reductions, split-key merge and causal softmax
run here, against the float64 reference, without a GPU.  What this cannot
show: timing, races between blocks, anything of the real memory system.
"""

from __future__ import annotations

import cuda_cpu
import numpy as np
import pytest

from opswitch.backends import cuda
from opswitch.core import Registry
from opswitch.testing import test_conformance as suite
from opswitch.testing.cases import CASES

pytestmark = pytest.mark.skipif(not cuda_cpu.available(), reason="needs g++ to build the kernels for the CPU")


@pytest.fixture(scope="module", autouse=True)
def built():
    for name in cuda.MODULES:  # once per machine (cached by source hash in the temp folder)
        cuda_cpu.build(name)


@pytest.fixture
def si(monkeypatch):
    from cuda_standin import StandIn

    return StandIn(kernels="cpu").install(monkeypatch)


@pytest.fixture
def backend(si):
    return Registry(autoload=False).select("cuda").backend


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_every_op_matches_the_reference(backend, case):
    suite.test_op_matches_reference(backend, case)


def test_decoding_through_the_cache_and_a_batch(backend):
    suite.test_decoding_through_the_cache_equals_attending_at_once(backend, 70)
    suite.test_a_batch_equals_each_sequence_alone(backend)


@pytest.mark.parametrize("weights", ["f32", "f16", "bf16", "int8"])
def test_greedy_decode_with_graphs_equals_the_naive_backend(monkeypatch, si, weights):
    """A 20-token prompt (SGEMM path, widened weights) and 6 decode steps (GEMV,
    split attention), replayed from a captured graph: the naive backend's logits."""
    from test_cuda import generate, tiny_gpt2

    from opswitch.model.gpt2 import GPT2

    monkeypatch.setenv(cuda.ENV_GRAPHS, "1")
    registry = Registry(autoload=False)
    config, params = tiny_gpt2()
    prompt = list(range(3, 23))
    model = GPT2(config, params, registry.select("cuda").backend, weights=weights)
    got = generate(model, prompt, 6)
    naive = registry.select("naive:float32").backend
    want = generate(GPT2(config, params, naive, weights=weights), prompt, 6)
    assert model.backend.graphs.counts["replayed"] == 3, model.backend.graphs.counts
    scale = np.abs(want).max()
    # float32 sums of <= 128 products, in another order than numpy's: a few ulps of the largest logit
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_fused_pairs_keep_every_output(backend):
    """add_layernorm and gemv_n's GELU epilogue, as CUDA code, on rows wider than a block."""
    from test_cuda import check_fused_pairs

    check_fused_pairs(backend)
