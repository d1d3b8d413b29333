"""``rs-compile``: demo, inspect, convert, bench and eval from the shell.

Each command imports what it needs, so ``--help`` and argument errors skip transformers and the models.
User errors (bad option values, unknown models, offline hub) print one clear message and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The convert / backend keywords the command line sets, validated before any work."""
    from rs_compile.config import split_options

    options = {"bits": args.bits, "group_size": args.group_size,
               "act_bits": getattr(args, "act_bits", None),
               "compress_tied": getattr(args, "compress_tied", None),
               "embeddings": getattr(args, "embeddings", None)}
    options = {k: v for k, v in options.items() if v is not None}
    split_options(options)
    return options


def _demo(args: argparse.Namespace) -> int:
    from rs_compile import demo

    demo.run(_options(args), iters=args.iters)
    return 0


def _loaded(name: str) -> tuple[Any, Any]:
    """``hub.load_model(name)`` under a progress bar (a large model takes a while)."""
    from rs_compile.hub import load_model
    from rs_compile.progress import progress

    with progress(f"loading {name}"):
        return load_model(name)


def _token_ids(model: Any, seq_len: int) -> torch.Tensor:
    """Dummy input ids; ValueError (before any compile) when the model cannot take them."""
    import torch

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError("inspect feeds token ids, but the model's config has no vocab_size")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and seq_len > positions:
        raise ValueError(f"--seq-len={seq_len} is longer than the model's {positions} positions "
                         f"(config.max_position_embeddings); pass --seq-len {positions} or less")
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))


def _layer_status(model: Any, report: Any) -> list[str]:
    """One line per Linear / Conv1D / CompressedLinear of the model: what the backend did with it."""
    from rs_compile.convert import linear_weight
    from rs_compile.modules import CompressedLinear

    done = {r.module: f"rewritten ({r.pattern}, {r.bits}-bit)" for r in report.linear_rewrites}
    skipped = {s.module: f"skipped: {s.reason}" for s in report.skipped}
    lines = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            status = "already compressed (CompressedLinear)"
        elif linear_weight(module) is not None:
            status = done.get(name) or skipped.get(name) or "not in the compiled graph (unused)"
        else:
            continue
        lines.append(f"{name:<44} {type(module).__name__:<16} {status}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    import rs_compile
    from rs_compile.progress import progress

    if args.seq_len < 1:
        raise ValueError(f"--seq-len={args.seq_len} is invalid; it must be >= 1")
    options = _options(args)
    model, _ = _loaded(args.model)
    ids = _token_ids(model, args.seq_len)
    with progress("inspect: compiling with the realitystone backend and running"):
        report = rs_compile.inspect(model, example_kwargs={"input_ids": ids}, **options)
    print(report)
    if args.layers:
        print("\nlayers:")
        print("\n".join(_layer_status(model, report)))
    if args.graphs:
        print("\ngraph before:\n" + report.graph_before)
        print("\ngraph after:\n" + report.graph_after)
    return 0


def _calibration(path: Path, tokenizer: Any) -> list[dict[str, Any]]:
    """convert(calibration=...) items: one tokenised line of ``path`` per item."""
    if tokenizer is None:
        raise ValueError("--calibration needs the model's tokenizer, but the model folder has none")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration file {path} has no non-empty lines")
    return [dict(tokenizer(line, return_tensors="pt")) for line in lines]


def _check_out_folder(out: Path) -> None:
    """ValueError unless ``out`` can become (or is) a folder: checked before any work."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is an existing file, but convert writes a folder; "
                         "pass a new or existing folder path")


def _convert(args: argparse.Namespace) -> int:
    import rs_compile
    from rs_compile.demo import model_bytes
    from rs_compile.hub import save_model

    _check_out_folder(args.out)
    options = _options(args)
    model, tokenizer = _loaded(args.model)
    calibration = _calibration(args.calibration, tokenizer) if args.calibration else None
    before = model_bytes(model)
    rs_compile.convert(model, calibration=calibration, progress=True, **options)
    print(model.rs_report)
    out = save_model(model, args.out, tokenizer)
    print(f"model bytes {before:,} -> {model_bytes(model):,}; saved to {out} "
          "(reload with rs_compile.hub.load_model or `rs-compile inspect`)")
    return 0


def _bench(argv: list[str]) -> int:
    from rs_compile import bench

    return bench.main(argv)


def _announcing(bar: Any, desc: str, quantize: Callable) -> Callable:
    """``quantize``, showing ``desc`` on ``bar`` while the harness uses it (it quantizes a codec's
    layers first, then measures that codec). Drawn at once: a fast codec is done before the next tick."""
    def run(name: str, weight: Any) -> Any:
        if bar.desc != desc:
            bar.set_description(desc)
        return quantize(name, weight)

    return run


def _eval(args: argparse.Namespace) -> int:
    from rs_compile.demo import fidelity_table, quantizer
    from rs_compile.eval import harness
    from rs_compile.progress import progress

    from rs_compile.config import split_options

    options = _options(args)
    model, tokenizer = _loaded(args.model)
    if tokenizer is not None and args.model != "minilm":
        return _eval_text(args, options, model, tokenizer)
    if args.gguf or args.configs != ["default"]:
        raise ValueError("--gguf and --configs apply to causal LMs with a tokenizer (gemma3-270m)")
    encoding, _ = split_options(options)
    quantizers = {f"rs_compile {encoding.bits}-bit g{encoding.group_size}": quantizer(encoding)}
    baselines = harness.baseline_quantizers(encoding.group_size)
    quantizers.update({b: baselines[b] for b in args.baseline})
    with progress("eval: reference outputs of the original model") as bar:
        quantizers = {name: _announcing(bar, f"eval: {name} ({i}/{len(quantizers)})", q)
                      for i, (name, q) in enumerate(quantizers.items(), 1)}
        if args.model == "minilm":
            results = harness.evaluate_encoder(model, tokenizer, quantizers)
        else:
            results = harness.evaluate_causal_lm(model, quantizers, n_sequences=args.sequences,
                                                 bleu_prompts=min(32, args.sequences))
    print(fidelity_table(results))
    return 0


OURS_CONFIGS = {  # --configs: rs_compile.convert variants, on top of --bits / --group-size
    "default": ({}, "whole model: linears and embedding (tied head reads its codes)"),
    "linears": ({"embeddings": False}, "embeddings=False: linears only, embedding/head dense"),
    "8bit": ({"bits": 8, "embedding_bits": 8}, "bits=8, embedding_bits=8, whole model"),
    "calibrated": ({}, "calibration=calibration.txt (one item per line): GPTQ, 4-bit, whole model"),
    "budget": ({"bit_budget": 4.5}, "calibration=calibration.txt, bit_budget=4.5 (3/4/8-bit "
               "layers chosen from each layer's measured effect), whole model"),
}


def _methods(args: argparse.Namespace, options: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The methods ``rs-compile eval`` compares on a tokenizer-equipped causal LM (``options``:
    the command line's convert keywords)."""
    from rs_compile.config import split_options
    from rs_compile.eval import harness, methods

    g = split_options(options)[0].group_size
    found = {}
    for name in args.configs:
        variant, _ = OURS_CONFIGS[name]
        calibration = (_calibration(harness.CALIBRATION_FILE, tokenizer)
                       if name in ("calibrated", "budget") else None)
        found[f"ours {name}"] = methods.ours({**options, **variant}, calibration)
    searched = methods.group_storage  # codes + a signed step byte per group + a bf16 row scale
    catalogue = {
        "nf4": ("NF4, searched scales", searched(4, g, 8, 16)),
        "rtn_int4": ("RTN int4, searched scales", searched(4, g, 8, 16)),
        "int8": ("RTN int8, searched scales", searched(8, g, 8, 16)),
        "hqq4": ("HQQ-style 4-bit (in-house)", searched(4, g, 32)),  # fp16 scale + fp16 zero
    }
    quantizers = harness.baseline_quantizers(g)
    for name in args.baseline:
        label, storage = catalogue[name]
        found[label] = methods.fake_quantized(quantizers[name], storage)
    for path in args.gguf:
        found[f"GGUF {path.stem}"] = methods.gguf(path)
    return found


def _eval_text(args: argparse.Namespace, options: dict[str, Any], model: Any, tokenizer: Any) -> int:
    import importlib.util

    from rs_compile.eval import harness, methods
    from rs_compile.progress import progress

    text = harness.held_out_text(tokenizer, args.tokens, args.prompts, args.prompt_tokens)
    found = _methods(args, options, tokenizer)
    sizes: dict[str, Any] = {}

    def student(name: str, method: Any) -> Any:
        built = method(model)
        sizes[name] = built
        return built.model

    from rs_compile.demo import model_bytes

    n_linear, n_table = methods.part_parameters(model)
    print(f"tokens: {text.description}; greedy continuations of {args.new_tokens} tokens; "
          f"KL(original || compressed) in nats. Parts: linears {n_linear / 1e6:.1f}M weights, "
          f"embedding/head {n_table / 1e6:.1f}M.")
    header = (f"{'method':<30} {'bpw lin':>7} {'bpw emb':>7} {'MB':>7} {'KLD':>8} {'top-1':>7} "
              f"{'ppl':>7} {'BLEU':>6}")

    def row(name: str, r: Any) -> str:
        if name == "original":
            lin = emb = 32.0
            mb = model_bytes(model) / 1e6
            name = "original (float32)"
        else:
            lin, emb, mb = sizes[name].linear_bits, sizes[name].embedding_bits, sizes[name].nbytes / 1e6
        return (f"{name:<30} {lin:>7.3f} {emb:>7.3f} {mb:>7.1f} {r.kl:>8.4f} {r.top1:>7.2%} "
                f"{r.ppl:>7.2f} {r.bleu:>6.1f}")

    print(f"as measured:\n{header}", flush=True)
    with progress("eval: reference outputs of the original model") as bar:
        results = harness.compare_causal_lm(
            model, {name: (lambda n=name, m=m: student(n, m)) for name, m in found.items()},
            text.sequences, text.prompts, args.new_tokens, batch_size=1,
            on_student=lambda name: bar.set_description(
                f"eval: {name} ({list(found).index(name) + 1}/{len(found)})"),
            on_result=lambda name, r: print(row(name, r), flush=True))
    print("\n".join([f"\n{header}", *(row(name, r) for name, r in results.items())]))
    for name in args.configs:
        print(f"ours {name}: {OURS_CONFIGS[name][1]}")
    if importlib.util.find_spec("hqq") is None:
        print("not run: HQQ from the hqq package (not installed; `pip install hqq`); the "
              "'HQQ-style' row, if any, is rs_compile.eval.baselines.hqq")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rs-compile", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version("rs-compile"))
    codec = argparse.ArgumentParser(add_help=False)
    codec.add_argument("--bits", type=int, help="code width: 2, 3, 4, 5 or 8 (default 4)")
    codec.add_argument("--group-size", type=int, help="weights per scale step, multiple of 8 (default 32)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", parents=[codec], help="compress a built-in model offline and measure it")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model (default 10); Gemma: prompts, at most 3")
    p.set_defaults(func=_demo)

    tied = argparse.ArgumentParser(add_help=False)
    tied.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=None,
                      help="compress embedding tables too; a tied lm_head then reads their codes "
                           "(default on)")
    tied.add_argument("--compress-tied", action="store_true", default=None,
                      help="with --no-embeddings: also compress a linear weight shared with another "
                           "reader, e.g. a tied lm_head (the other reader keeps the dense copy)")

    p = sub.add_parser("inspect", parents=[codec, tied],
                       help="what the backend rewrites in a model, and why not")
    p.add_argument("model", help="local model folder or built-in name (tinystories, minilm, gpt2-tiny, ...)")
    p.add_argument("--layers", action="store_true", help="list every linear layer with its status")
    p.add_argument("--graphs", action="store_true", help="print the FX graphs before and after")
    p.add_argument("--seq-len", type=int, default=16,
                   help="dummy input length, at most the model's positions (default 16)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", parents=[codec, tied], help="compress a model folder and save it")
    p.add_argument("model", help="local model folder or built-in name")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--act-bits", type=int, choices=(0, 8),
                   help="8: int8 activations at run time, the fastest CPU decode (default 0)")
    p.add_argument("--calibration", type=Path, help="text file, one calibration sample per line")
    p.set_defaults(func=_convert)

    sub.add_parser("bench", add_help=False, help="benchmarks (rs_compile.bench; `bench --help`)")

    p = sub.add_parser("eval", parents=[codec], help="fidelity of the codec on a trained built-in model")
    p.add_argument("--model", choices=("tinystories", "minilm", "gemma3-270m"), default="tinystories")
    p.add_argument("--baseline", nargs="*", default=[], choices=("nf4", "rtn_int4", "int8", "hqq4"),
                   help="also evaluate these reference codecs (per-group scales found by the same "
                        "search as ours, except hqq4's own zero-point search)")
    p.add_argument("--sequences", type=int, default=64,
                   help="held-out sequences (a causal LM without a tokenizer: tinystories)")
    p.add_argument("--configs", nargs="*", default=["default"], choices=tuple(OURS_CONFIGS),
                   help="rs_compile variants (gemma3-270m): default (whole model), linears "
                        "(embeddings=False), 8bit, calibrated (GPTQ on calibration.txt), budget "
                        "(calibrated with bit_budget=4.5)")
    p.add_argument("--gguf", nargs="*", default=[], type=Path, metavar="FILE",
                   help="GGUF files of the same model (e.g. llama.cpp Q4_0 / IQ4_XS / Q8_0), read "
                        "back dequantized and scored on the same tokens (gemma3-270m)")
    p.add_argument("--tokens", type=int, default=1024,
                   help="held-out tokens after BOS (rs_compile/eval/data/heldout.txt; default 1024)")
    p.add_argument("--prompts", type=int, default=32, help="BLEU prompts (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per BLEU prompt after BOS")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per continuation")
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _bench(rest) if args.command == "bench" else args.func(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"rs-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
