"""``import rs_compile`` is cheap and changes nothing in torch; the lowerings install on first use.

Each check runs in a fresh interpreter: in this one, other tests have long imported Inductor and
installed the lowerings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_import_loads_neither_inductor_nor_transformers_and_submodules_load_on_access():
    out = run_python("""
import json, sys
import rs_compile
heavy = sorted(m for m in sys.modules if m.startswith(("torch._inductor", "torch._dynamo", "sympy",
                                                       "transformers", "triton")))
print(json.dumps({"heavy": heavy[:10],
                  "hub": rs_compile.hub.load_model.__module__,
                  "generation": rs_compile.generation.compile_for_generation.__module__}))
""")
    assert out == {"heavy": [], "hub": "rs_compile.hub", "generation": "rs_compile.generation"}


def test_lowerings_install_on_the_first_trace_and_chain_the_users_pass():
    """Route 2: a converted model compiled by plain Inductor gets the fused decomposition (no call
    of the op's reference kernel) and the source key, and the user's own pass still runs."""
    out = run_python("""
import json
import torch
from torch import nn
from torch._inductor import config, decomposition
from torch._inductor.codegen.cpp import CppVecKernel
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

class UserPass(CustomGraphPass):
    calls = 0
    def __call__(self, graph):
        UserPass.calls += 1
    def uuid(self):
        return "user-pass"

user = UserPass()
config.post_grad_custom_post_pass = user
state = lambda: (config.post_grad_custom_post_pass, CppVecKernel._get_vec_load_line,
                 len(decomposition.decompositions))
before = state()
import rs_compile
model = rs_compile.convert(nn.Sequential(nn.Linear(256, 384)).eval(), group_size=32)
unchanged = state() == before
with torch.no_grad(), config.patch(fx_graph_cache=False):
    _, code = run_and_get_code(torch.compile(model, backend="inductor"), torch.randn(1, 256))
passes = config.post_grad_custom_post_pass
print(json.dumps({"unchanged_until_compile": unchanged,
                  "reference_call": "torch.ops.rs.linear.default(" in "\\n".join(code),
                  "passes": [type(p).__name__ for p in passes], "user_calls": UserPass.calls}))
""")
    assert out == {"unchanged_until_compile": True, "reference_call": False,
                   "passes": ["UserPass", "SourceKeyedPass"], "user_calls": 1}
