"""Peak memory of loading a model compressed: from_pretrained(quantization_config=RealityStoneConfig)
against loading it dense and converting it afterwards, on a random GPT-2-small checkpoint.

    python benchmarks/hf_load_memory.py [--folder /tmp/rs_gpt2_small] [--size small]
                                        [--routes dense,convert,on-load]

Writes the random fp32 checkpoint (save_pretrained) to ``--folder`` once, then runs each route in
a fresh interpreter, one after the other:

  dense       from_pretrained(folder)                                          (fp32 model)
  convert     from_pretrained(folder), then rs_compile.convert(model)          (the old route)
  on-load     from_pretrained(folder, quantization_config=RealityStoneConfig(bits=4))
  on-load-linears  the same with embeddings=False: linears only, the tables stay dense

Each reports, in MiB above the interpreter after its imports: the peak of anonymous resident
memory (RssAnon of /proc/self/status, sampled every 2 ms by a thread: the process's own
allocations, excluding the checkpoint's pages that safetensors maps from the file, which the
kernel can drop at any time) and the peak resident set (ru_maxrss: anonymous plus the mapped
file pages touched). Also the bytes of the loaded model's tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time
import torch, transformers
import rs_compile
from transformers import AutoModelForCausalLM
from rs_compile.demo import model_bytes

def anon_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

folder, route = sys.argv[1], sys.argv[2]
base, peak, stop = anon_kib(), [0], False
base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def sample():
    while not stop:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True)
t.start()
start = time.perf_counter()
if route.startswith("on-load"):
    config = rs_compile.RealityStoneConfig(bits=4, embeddings=route == "on-load")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
    if route == "convert":
        model = rs_compile.convert(model)
seconds = time.perf_counter() - start
stop = True
t.join()
peak[0] = max(peak[0], anon_kib())
print(json.dumps({"route": route, "peak_anon_mib": (peak[0] - base) / 1024,
                  "peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss) / 1024,
                  "model_mib": model_bytes(model) / 2**20, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/rs_gpt2_small")
    parser.add_argument("--size", default="small", help="rs_compile.models.configs GPT-2 size")
    parser.add_argument("--routes", default="dense,convert,on-load",
                        help="comma-separated: dense, convert, on-load, on-load-linears")
    args = parser.parse_args()
    folder = Path(args.folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", "import sys; from rs_compile.models import configs; "
                        f"configs.gpt2({args.size!r}, seed=0).save_pretrained(sys.argv[1])", str(folder)],
                       env=env, check=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, checkpoint "
          f"{(folder / 'model.safetensors').stat().st_size / 2**20:.0f} MiB")
    print(f"{'route':15s} {'peak anon MiB':>14s} {'peak RSS MiB':>13s} {'model MiB':>10s} {'seconds':>8s}")
    for route in args.routes.split(","):
        done = subprocess.run([sys.executable, "-c", CHILD, str(folder), route], env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{route} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.splitlines()[-1])
        print(f"{route:15s} {r['peak_anon_mib']:14.0f} {r['peak_rss_mib']:13.0f} {r['model_mib']:10.0f} "
              f"{r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
