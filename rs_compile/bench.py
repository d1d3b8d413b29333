"""``rs-compile bench``: decode and prefill speed of eager, Inductor, torchao and rs_compile.

Every configuration is built, compiled and warmed up in one process, then timed interleaved
(config A, B, C, A, B, C, ...) and the median of the repeats is reported, so machine noise hits
all configurations alike. Random-weight models of real shapes (rs_compile.models.configs).

Per configuration:
  decode tok/s    63 / (t(generate 64 new) - t(generate 1 new)): steady-state decode rate
  cpu ms/tok      process CPU time per decode token, all threads: on a machine shared with other
                  jobs (where wall time depends on what else runs) the more stable figure
  e2e tok/s       64 / t(generate 64 new), prefill of the prompt included
  prefill ms      one forward of ``--prefill`` tokens without cache, logits of the last token
  weights MB      bytes of every linear's weight (lm_head included) a decode step streams
  GB/s            those bytes / decode time per token, against the measured read bandwidth
  compile s       first generate + first prefill, minus their steady-state times

The 1-minute load average is printed before and after the timing, with a warning when it exceeds
the core count (other jobs then take the cores: wall-clock figures mean little). A configuration
whose figures contradict each other is flagged in its note (:func:`implausible`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from rs_compile.progress import progress

MODELS = ("kogpt2", "gpt2-tiny", "gpt2-small", "llama-tiny", "llama-small")
CONFIGS = ("eager", "inductor", "torchao-int8", "torchao-int4", "torchao-intx4", "rs-4bit", "rs-8bit",
           "rs-4bit-a8")


@dataclass
class Result:
    config: str
    decode_tok_s: float = float("nan")
    cpu_ms_per_token: float = float("nan")
    e2e_tok_s: float = float("nan")
    prefill_ms: float = float("nan")
    weight_mb: float = float("nan")
    stream_gb_s: float = float("nan")
    compile_s: float = float("nan")
    note: str = ""
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def build_model(name: str) -> torch.nn.Module:
    from rs_compile.models import configs

    family, _, size = name.partition("-")
    if family == "kogpt2":
        return configs.kogpt2()
    return getattr(configs, family)(size)


def _torchao(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """torchao weight-only: int8 per channel; int4 in groups of 64 (torchao's packed int4 kernels);
    intx4: int4 values in groups of 64 stored one per int8 byte (the CPU fallback torchao offers)."""
    from torchao.quantization import (Int4WeightOnlyConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig, quantize_)
    from torchao.quantization.granularity import PerGroup

    _conv1d_to_linear(model)  # quantize_ rewrites nn.Linear only: GPT-2's Conv1D layers too
    config = {"int8": lambda: Int8WeightOnlyConfig(),
              "int4": lambda: Int4WeightOnlyConfig(group_size=64),
              "intx4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))}
    quantize_(model, config[kind]())
    return model


def _conv1d_to_linear(model: torch.nn.Module) -> None:
    """Replace transformers' Conv1D (weight stored [in, out]) by the equal nn.Linear, in place."""
    from rs_compile.convert import linear_weight

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            found = linear_weight(child)
            if found is None or type(child) is torch.nn.Linear:
                continue
            weight, bias = found
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                     device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            setattr(parent, name, linear)


def _rs(model: torch.nn.Module, args: argparse.Namespace, bits: int, act_bits: int = 0) -> torch.nn.Module:
    import rs_compile

    # embeddings stay dense, as in the torchao configs (quantize_ rewrites nn.Linear only)
    return rs_compile.convert(model, bits=bits, embeddings=False, compress_tied=args.compress_tied,
                              act_bits=act_bits)


# config -> (weight transform, torch.compile backend or None for eager)
PREPARE: dict[str, tuple[Callable[[torch.nn.Module, argparse.Namespace], torch.nn.Module], str | None]] = {
    "eager": (lambda m, args: m, None),
    "inductor": (lambda m, args: m, "inductor"),
    "torchao-int8": (lambda m, args: _torchao(m, "int8"), "inductor"),
    "torchao-int4": (lambda m, args: _torchao(m, "int4"), "inductor"),
    "torchao-intx4": (lambda m, args: _torchao(m, "intx4"), "inductor"),
    "rs-4bit": (lambda m, args: _rs(m, args, 4), "realitystone"),
    "rs-8bit": (lambda m, args: _rs(m, args, 8), "realitystone"),
    "rs-4bit-a8": (lambda m, args: _rs(m, args, 4, act_bits=8), "realitystone"),
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, including the inner tensors of a subclass (torchao)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every linear layer's weight (+ bias): what one decode step has to read."""
    from rs_compile.convert import linear_weight
    from rs_compile.modules import CompressedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear) or linear_weight(module) is not None:
            total += sum(tensor_bytes(t) for t in (*module.parameters(recurse=False),
                                                   *module.buffers(recurse=False)))
    return total


def read_bandwidth_gb_s(mbytes: int = 512, repeats: int = 5) -> float:
    """Median read bandwidth of ``sum`` over a buffer much larger than the caches."""
    x = torch.ones(mbytes * 2**20 // 4)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def load_note() -> str:
    """The 1-minute load average, with a warning when it exceeds the core count."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    warn = f" WARNING: above the {cores} cores, wall-clock figures are unreliable" if load > cores else ""
    return f"load average {load:.2f} on {cores} cores{warn}"


def implausible(t_new: float, t_one: float, new_tokens: int, cpu_per_token: float,
                threads: int) -> str:
    """Why figures timed as ``t_new`` = t(generate ``new_tokens``), ``t_one`` = t(generate 1) (wall
    seconds) and ``cpu_per_token`` (process CPU seconds per decode token) cannot all be right, or
    "". Decode tok/s is (new - 1) / (t_new - t_one) and e2e tok/s new / t_new: decode time <= 0, an
    e2e rate above the decode rate (the first token, prefill included, faster than an average
    decode step) or more CPU per token than the threads can spend all mean the samples were
    disturbed (another job, a recompile), not that the model ran that fast."""
    per_token = (t_new - t_one) / (new_tokens - 1)
    if per_token <= 0:
        return f"IMPOSSIBLE: t(generate {new_tokens}) <= t(generate 1), decode time <= 0"
    if new_tokens / t_new > 1 / per_token:
        return (f"IMPLAUSIBLE: e2e {new_tokens / t_new:.1f} tok/s above decode {1 / per_token:.1f} "
                "tok/s (the first token, prefill included, faster than an average one)")
    if cpu_per_token > 1.1 * threads * per_token:
        return (f"IMPOSSIBLE: {cpu_per_token * 1e3:.1f} ms CPU per token on {threads} threads in "
                f"{per_token * 1e3:.1f} ms")
    return ""


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


class Runner:
    """One prepared model with its timed workloads."""

    def __init__(self, config: str, base: torch.nn.Module, args: argparse.Namespace):
        from rs_compile.generation import compile_for_generation

        transform, backend = PREPARE[config]
        self.model = transform(copy.deepcopy(base), args).eval()
        self.weight_bytes = streamed_weight_bytes(self.model)
        if backend is not None:
            compile_for_generation(self.model, backend)
        else:  # eager runs as users run it: transformers' default dynamic cache
            self.model.generation_config.pad_token_id = self.model.config.eos_token_id
        vocab = self.model.config.vocab_size
        rng = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, vocab, (1, args.prompt), generator=rng)
        self.long = torch.randint(0, vocab, (1, args.prefill), generator=rng)
        self.new_tokens = args.new_tokens

    def decode(self, new_tokens: int) -> torch.Tensor:
        """The prompt and exactly ``new_tokens`` greedy tokens. EOS is switched off rather than
        deferred with ``min_new_tokens``, whose logits processor runs an isin over the whole
        vocabulary at every step (~0.85 ms per token here, profiled): model-independent work that
        users who do not set ``min_new_tokens`` never pay."""
        return self.model.generate(self.prompt, max_new_tokens=new_tokens, eos_token_id=None,
                                   do_sample=False)

    def generate(self, new_tokens: int) -> tuple[float, float]:
        return _timed(lambda: self.decode(new_tokens))

    def prefill(self) -> tuple[float, float]:
        if not self.long.numel():
            return 0.0, 0.0
        return _timed(lambda: self.model(self.long, use_cache=False, logits_to_keep=1))


def run(args: argparse.Namespace) -> list[Result]:
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # many compiled copies of one forward share a cache
    torch._dynamo.config.accumulated_recompile_limit = 1024
    base = build_model(args.model).eval()
    results, runners = [], {}
    with torch.inference_mode(), progress("bench: prepare", total=len(args.configs)) as bar:
        for config in args.configs:
            bar.set_description(f"bench: convert, compile and warm up {config}")
            result = Result(config)
            results.append(result)
            try:
                runner = Runner(config, base, args)
                first = runner.generate(runner.new_tokens)[0] + runner.prefill()[0]
                runner.generate(1)
                steady = runner.generate(runner.new_tokens)[0] + runner.prefill()[0]
            except Exception as e:  # noqa: BLE001  (report the configuration as unavailable)
                result.note = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            else:
                result.compile_s = first - steady
                result.weight_mb = runner.weight_bytes / 1e6
                runners[config] = runner
            bar.update()
    print(f"bench: timing starts, {load_note()}", file=sys.stderr, flush=True)
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {
        c: {"gen": [], "gen1": [], "prefill": []} for c in runners}
    with torch.inference_mode(), progress("bench: interleaved timing", total=args.repeats) as bar:
        for _ in range(args.repeats):
            for config, runner in runners.items():
                samples[config]["gen"].append(runner.generate(runner.new_tokens))
                samples[config]["gen1"].append(runner.generate(1))
                if args.prefill:
                    samples[config]["prefill"].append(runner.prefill())
            bar.update()
    for result in results:
        if result.config not in samples:
            continue
        s = samples[result.config]
        gen, gen1 = (statistics.median(t[0] for t in s[k]) for k in ("gen", "gen1"))
        cpu, cpu1 = (statistics.median(t[1] for t in s[k]) for k in ("gen", "gen1"))
        per_token = (gen - gen1) / (args.new_tokens - 1)
        bad = implausible(gen, gen1, args.new_tokens, (cpu - cpu1) / (args.new_tokens - 1), args.threads)
        if bad:
            result.note = f"{result.note}; {bad}" if result.note else bad
        result.decode_tok_s = 1 / per_token if per_token > 0 else float("nan")
        result.cpu_ms_per_token = (cpu - cpu1) / (args.new_tokens - 1) * 1e3
        result.e2e_tok_s = args.new_tokens / gen
        if s["prefill"]:
            result.prefill_ms = statistics.median(t[0] for t in s["prefill"]) * 1e3
        result.stream_gb_s = result.weight_mb / 1e3 * result.decode_tok_s
        result.samples = s
    return results


def table(results: list[Result], bandwidth: float) -> str:
    ref = {r.config: r for r in results}
    base = ref.get("eager")
    lines = [("| config | decode tok/s | vs eager | cpu ms/tok | e2e tok/s | prefill ms | weights MB "
              "| GB/s | compile s | note |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        speedup = r.decode_tok_s / base.decode_tok_s if base else float("nan")
        lines.append(f"| {r.config} | {r.decode_tok_s:.1f} | {speedup:.2f}x | {r.cpu_ms_per_token:.1f} | "
                     f"{r.e2e_tok_s:.1f} | "
                     f"{r.prefill_ms:.0f} | {r.weight_mb:.0f} | {r.stream_gb_s:.1f} | "
                     f"{r.compile_s:.0f} | {r.note} |")
    lines.append(f"\nread bandwidth (sum over 512 MB, {torch.get_num_threads()} threads): "
                 f"{bandwidth:.1f} GB/s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rs-compile bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="kogpt2")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens; 0 skips (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compress-tied", action=argparse.BooleanOptionalAction, default=True,
                   help="rs configs also compress weights shared with another reader, e.g. a tied "
                        "lm_head, which every decode step streams (default on)")
    p.add_argument("--json", help="also write the results (with all samples) to this file")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt < 1 or args.repeats < 1 or args.prefill < 0:
        p.error("need --new-tokens >= 2, --prompt >= 1, --repeats >= 1, --prefill >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = load_note()
    results = run(args)
    bandwidth = read_bandwidth_gb_s()
    print(f"model {args.model}, prompt {args.prompt}, new tokens {args.new_tokens}, prefill "
          f"{args.prefill}, median of {args.repeats}, {args.threads} threads, torch {torch.__version__}")
    print(f"before: {start}; after: {load_note()}")
    print(table(results, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "read_gb_s": bandwidth,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
