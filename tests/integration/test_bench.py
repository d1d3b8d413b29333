"""The decode benchmark's workload: what it times must be the tokens it claims."""

import argparse

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
