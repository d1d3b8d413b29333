"""Greedy tokens of the compiled compressed bench model against the eager compressed model.

    python benchmarks/greedy_equality.py --act-bits 8      # KoGPT-2 config, 32-token prompt, 32 new

The tests check this on tiny models (tests/integration/test_generate.py); this is the same check on
the 125M model the decode benchmark times (random weights: close top-2 logits are common, so the
smallest top-2 gap is printed beside the largest logit difference).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import rs_compile
from rs_compile.bench import MODELS, build_model
from rs_compile.generation import compile_for_generation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="kogpt2")
    p.add_argument("--act-bits", type=int, choices=(0, 8), default=8)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    model = rs_compile.convert(build_model(args.model).eval(), bits=4, compress_tied=True,
                               act_bits=args.act_bits)
    eager = copy.deepcopy(model)
    eager.generation_config.pad_token_id = eager.config.eos_token_id
    prompt = torch.randint(0, model.config.vocab_size, (1, 32),
                           generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        start = time.time()
        e = eager.generate(prompt, **kw)
        print(f"eager {time.time() - start:.0f} s")
        compiled = compile_for_generation(model)
        start = time.time()
        c = compiled.generate(prompt, **kw)
        print(f"compiled (incl. compile) {time.time() - start:.0f} s")
    tokens, compiled_tokens = e.sequences[0, 32:], c.sequences[0, 32:]
    logits, compiled_logits = torch.cat(e.logits), torch.cat(c.logits)
    top2 = logits.topk(2, dim=-1).values
    same = int((tokens == compiled_tokens).cumprod(0).sum())
    print(f"{args.model} act_bits={args.act_bits}: first {same} of {args.tokens} greedy tokens equal; "
          f"max |logit difference| {(logits - compiled_logits).abs().max().item():.3g}, "
          f"smallest top-2 gap {(top2[:, 0] - top2[:, 1]).min().item():.3g}")


if __name__ == "__main__":
    main()
