"""rs_compile.export: an AOTInductor package of a converted model, run in a fresh process.

One package (a small converted model, dynamic sequence length) is built per module and loaded in
a subprocess that imports only ``rs_compile.ops``; its outputs at a decode-shaped and a
prefill-shaped length are compared with the compiled and eager converted model and with a float64
reference computed from the decoded weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rs_compile
from rs_compile.lowering import cpu_kernel

REPO = Path(__file__).resolve().parents[2]
SEQ_LENGTHS = (1, 24)  # one row per linear (the kernel's GEMV); 24 > GEMV_MAX_ROWS (decode + BLAS)
VOCAB = 300


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64, bias=False)

    def forward(self, ids):
        return self.down(F.gelu(self.up(self.emb(ids))))


def reference(model: Tiny, ids: torch.Tensor) -> torch.Tensor:
    """float64 forward on the decoded weights: what the compressed model approximates exactly."""
    h = model.emb.dequantize().double()[ids]
    h = F.gelu(F.linear(h, model.up.dequantize().double(), model.up.bias.double()))
    return F.linear(h, model.down.dequantize().double())


@pytest.fixture(scope="module")
def converted() -> Tiny:
    torch.manual_seed(0)
    return rs_compile.convert(Tiny()).eval()


@pytest.fixture(scope="module")
def package(converted, tmp_path_factory) -> Path:
    ids = torch.randint(0, VOCAB, (1, 5))
    seq = torch.export.Dim("seq", min=1, max=64)
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    assert rs_compile.export(converted, (ids,), path, {"ids": {1: seq}}) == path
    return path


RUN_PACKAGE = """
import json, sys
import torch
import rs_compile.ops  # registers the rs ops the package calls: nothing else of rs_compile
from rs_compile.lowering import cpu_kernel

kern = cpu_kernel.kernel()
modes = []  # the kernel's mode argument per call: 0 = fused GEMV, 1 = decode rows (then BLAS)
cpu_kernel._state["kernel"] = lambda *a: modes.append(a[16]) or kern(*a)
runner = torch._inductor.aoti_load_package(sys.argv[1])
calls = {}
for n in json.loads(sys.argv[2]):
    modes.clear()
    out = runner(torch.load(sys.argv[3] + f"/ids{n}.pt"))
    torch.save(out, sys.argv[3] + f"/out{n}.pt")
    calls[n] = list(modes)
print(json.dumps({"calls": calls}))
"""


def run_package(path: Path, ids: dict[int, torch.Tensor], folder: Path) -> tuple[dict, dict]:
    for n, t in ids.items():
        torch.save(t, folder / f"ids{n}.pt")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RUN_PACKAGE, str(path), json.dumps(list(ids)),
                           str(folder)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.splitlines()[-1])
    return {n: torch.load(folder / f"out{n}.pt") for n in ids}, info


@pytest.mark.skipif(cpu_kernel.kernel() is None, reason="the CPU kernel did not build here")
def test_package_runs_in_a_fresh_process_like_the_compiled_model(converted, package, tmp_path):
    gen = torch.Generator().manual_seed(1)
    ids = {n: torch.randint(0, VOCAB, (1, n), generator=gen) for n in SEQ_LENGTHS}
    outs, info = run_package(package, ids, tmp_path)
    compiled = torch.compile(converted)
    for n, x in ids.items():
        with torch.no_grad():
            eager, comp = converted(x), compiled(x)
        ref = reference(converted, x)
        assert outs[n].shape == (1, n, 64) and outs[n].dtype == torch.float32
        torch.testing.assert_close(outs[n], comp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[n], eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[n].double(), ref, rtol=1e-5, atol=1e-5)
    # the hand-written kernel ran in the package: the embedding decodes its rows (mode 1), then
    # each linear runs the fused GEMV on the one-row call, kernel-decoded weights + BLAS on 24 rows
    assert info["calls"] == {"1": [1, 0, 0], "24": [1, 1, 1]}


def test_export_refuses_bad_input_before_tracing(converted, tmp_path):
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="no compressed layers.*rs_compile.convert"):
        rs_compile.export(Tiny().eval(), (ids,), tmp_path / "dense.pt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rs_compile.export(converted, (ids,), tmp_path / "missing" / "m.pt2")
    with pytest.raises(ValueError, match="must end in .pt2"):
        rs_compile.export(converted, (ids,), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        (tmp_path / "d.pt2").mkdir()
        rs_compile.export(converted, (ids,), tmp_path / "d.pt2")
    if Path("/proc/sys").is_dir():  # not writable even by root
        with pytest.raises(PermissionError, match="cannot write into"):
            rs_compile.export(converted, (ids,), "/proc/sys/m.pt2")
    with pytest.raises(TypeError, match="_orig_mod"):
        rs_compile.export(torch.compile(converted), (ids,), tmp_path / "c.pt2")
    converted.train()
    try:
        with pytest.raises(ValueError, match="training mode.*model.eval"):
            rs_compile.export(converted, (ids,), tmp_path / "t.pt2")
    finally:
        converted.eval()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pt2"]  # nothing written


def test_export_is_public():
    assert "export" in rs_compile.__all__ and callable(rs_compile.export)
    assert "rs_compile.export" in (REPO / "docs" / "api.md").read_text()
