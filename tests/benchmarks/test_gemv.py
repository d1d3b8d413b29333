"""GEMV microbenchmark (pytest-benchmark; excluded from the default run):

    pytest tests/benchmarks -p no:cacheprovider --benchmark-only

One KoGPT-2 MLP projection (3072 x 768) at batch 1: the compiled rs::linear against dense float32
F.linear, eager and Inductor. 48 different layers are chained so that every configuration's weights
stream from memory as in a decode step: 4-bit codes total 60 MB and 8-bit 117 MB, both above this
CPU's 32 MB L3, dense float32 453 MB.
"""

import pytest
import torch
import torch.nn.functional as F

from rs_compile.codec.encode import encode
from rs_compile.codec.format import Format
from rs_compile.modules import CompressedLinear

N, K, LAYERS = 3072, 768, 48


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(N, K, generator=g) * 0.02 for _ in range(LAYERS)]


def chain(layers):
    def run(x):
        for layer in layers:
            x = torch.tanh(layer(x)[..., :K])
        return x
    return run


def _bench(benchmark, fn):
    x = torch.randn(1, K)
    with torch.inference_mode():
        fn(x)
        benchmark(fn, x)


@pytest.mark.parametrize("bits,act_bits", [(4, 0), (8, 0), (4, 8)])
def test_rs_compiled(benchmark, weights, bits, act_bits):
    layers = [CompressedLinear(encode(w, Format(bits)), act_bits=act_bits) for w in weights]
    _bench(benchmark, torch.compile(chain(layers), backend="realitystone"))


def test_dense_eager(benchmark, weights):
    _bench(benchmark, chain([lambda x, w=w: F.linear(x, w) for w in weights]))


def test_dense_inductor(benchmark, weights):
    _bench(benchmark, torch.compile(chain([lambda x, w=w: F.linear(x, w) for w in weights])))
