"""TinyStories-260K (a trained Llama): fidelity (KL, top-1, greedy BLEU) and speed, offline.

Reads ../shared/models/stories260K.bin (llama2.c format) through rs_compile.models.tinystories.
Its tokenizer is not available, so text is compared as token ids (1 = BOS).

    python examples/llama_tinystories.py [--path stories260K.bin] [--bits 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

import rs_compile
from rs_compile.demo import fidelity_table, quantizer, speed_line
from rs_compile.eval import harness
from rs_compile.models.tinystories import default_stories_path, load_llama2c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=default_stories_path(), help="llama2.c checkpoint")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    if args.path is None:
        parser.error("../shared/models/stories260K.bin not found; pass --path")
    model = load_llama2c(args.path)
    # The model is 64 wide: groups of 32 keep two groups per row.
    config = rs_compile.EncodingConfig(bits=args.bits, group_size=32)

    # A 260K-parameter model is fragile: 8 bits shows what the codec keeps when it is not starved.
    codecs = {f"rs_compile {b}-bit g32": quantizer(dataclasses.replace(config, bits=b))
              for b in sorted({args.bits, 8})}
    results = harness.evaluate_causal_lm(model, {**codecs, "nf4": harness.baseline_quantizers(32)["nf4"]})
    print(fidelity_table(results))

    converted = rs_compile.convert(copy.deepcopy(model), config)
    print(converted.rs_report)
    bos = torch.ones(1, 1, dtype=torch.long)
    print(speed_line(model, converted, {"input_ids": bos.repeat(1, 64)}))
    with torch.no_grad():
        story = converted.generate(bos, max_new_tokens=24, do_sample=False)
        reference = model.generate(bos, max_new_tokens=24, do_sample=False)
    print("original  :", reference[0].tolist())
    print("compressed:", story[0].tolist())


if __name__ == "__main__":
    main()
