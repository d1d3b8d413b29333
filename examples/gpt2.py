"""GPT-2 / KoGPT-2: compress, check fidelity and speed, generate, save and reload.

Offline by default: with a reachable hub it loads ``skt/kogpt2-base-v2`` (125M, about a minute to
compress), otherwise a random tiny GPT-2 built locally (its fidelity only shows the machinery).

    python examples/gpt2.py [--model NAME_OR_DIR] [--bits 4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import rs_compile
from rs_compile.demo import fidelity_table, quantizer, speed_line
from rs_compile.eval import harness
from rs_compile.hub import hub_reachable, load_model, save_model
from rs_compile.models import configs

HUB_MODEL = "skt/kogpt2-base-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model folder or hub name (default {HUB_MODEL} if reachable)")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    if args.model or hub_reachable():
        model, _ = load_model(args.model or HUB_MODEL)
    else:
        print(f"hub unreachable: using a random tiny GPT-2 instead of {HUB_MODEL}")
        model = configs.gpt2("tiny")
    config = rs_compile.EncodingConfig(bits=args.bits)

    results = harness.evaluate_causal_lm(
        model, {f"rs_compile {config.bits}-bit": quantizer(config), "nf4": harness.baseline_quantizers()["nf4"]},
        n_sequences=16, length=64, bleu_prompts=8, new_tokens=32)
    print(fidelity_table(results))

    converted = rs_compile.convert(copy.deepcopy(model), config, progress=True)
    print(converted.rs_report)
    prompt = torch.tensor([[model.config.bos_token_id or 0]])
    print(speed_line(model, converted, {"input_ids": prompt.repeat(1, 64)}))

    # transformers' generate runs unchanged on the converted model (eager here).
    tokens = converted.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    print("greedy tokens:", tokens[0].tolist())
    with tempfile.TemporaryDirectory() as folder:
        save_model(converted, folder)  # rs_compile.save + config.json (or save_pretrained)
        reloaded, _ = load_model(folder)  # rebuilt on the meta device, no fp32 weights
        again = reloaded.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    print("reloaded model generates the same tokens:", torch.equal(tokens, again))


if __name__ == "__main__":
    main()
