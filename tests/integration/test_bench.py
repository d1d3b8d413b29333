"""The decode benchmark's workload: what it times must be the tokens it claims."""

import argparse
import copy

import pytest

import torch

from rs_compile.bench import Runner, build_model


def test_decode_makes_exactly_the_requested_tokens_even_past_eos():
    args = argparse.Namespace(prompt=8, prefill=0, new_tokens=6)
    runner = Runner("eager", build_model("gpt2-tiny").eval(), args)
    with torch.inference_mode():
        first = runner.model(runner.prompt).logits[0, -1].argmax().item()
        runner.model.generation_config.eos_token_id = first  # a model that "ends" at once
        stopped = runner.model.generate(runner.prompt, max_new_tokens=6, do_sample=False)
        out = runner.decode(6)
    assert stopped.shape[1] == 8 + 1  # plain generate stops at the first token
    assert out.shape == (1, 8 + 6) and torch.equal(out[:, :9], stopped)


def test_torchao_configs_quantize_every_linear_gpt2_conv1d_included():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from rs_compile.bench import PREPARE, streamed_weight_bytes
    from rs_compile.convert import linear_weight

    base = build_model("gpt2-tiny").eval()
    layers = [m for m in base.modules() if linear_weight(m) is not None]
    weights = sum(linear_weight(m)[0].numel() for m in layers)
    biases = sum(m.bias.numel() for m in layers if m.bias is not None)
    assert any(type(m) is not torch.nn.Linear for m in layers)  # GPT-2 holds Conv1D layers
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        expected = base(x).logits
    quantized = PREPARE["torchao-int8"][0](copy.deepcopy(base), None)
    assert all(type(m) is torch.nn.Linear for m in quantized.modules() if linear_weight(m) is not None)
    # int8 codes (1 byte/weight) + per output row an fp32 scale and an int8 zero point; fp32 biases
    rows = sum(linear_weight(m)[0].shape[0] for m in layers)
    assert streamed_weight_bytes(quantized) == weights + 4 * biases + 5 * rows
    with torch.no_grad():
        got = quantized(x).logits
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_implausible_flags_contradicting_figures_only():
    from rs_compile.bench import implausible

    # 64 tokens in 1.0 s, 1 token in 0.1 s: 63 / 0.9 = 70 tok/s decode, 64 e2e; 20 ms CPU per token
    assert implausible(1.0, 0.1, 64, 0.020, 2) == ""
    assert "decode time <= 0" in implausible(0.1, 0.1, 64, 0.0, 2)
    # the first token (prefill included) faster than an average decode step
    assert "IMPLAUSIBLE" in implausible(1.0, 0.001, 64, 0.010, 2)
    # 40 ms of CPU per token with 2 threads in 14 ms of wall time
    assert "CPU per token" in implausible(1.0, 0.1, 64, 0.040, 2)


def test_bench_prints_the_load_average(capsys):
    from rs_compile.bench import main

    assert main(["--model", "gpt2-tiny", "--configs", "eager", "--prompt", "4", "--new-tokens", "2",
                 "--prefill", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "load average" in out and f"on {__import__('os').cpu_count()} cores" in out
