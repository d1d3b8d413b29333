"""rs_compile.codec.format is the one definition of the format: after an edit of its constants,
every decode path (encoder, reference op, CPU kernel, Inductor decomposition, Triton kernel)
follows, or the kernel build fails loudly. The edit is made in a subprocess
(_format_change_check.py) so that it never reaches this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rs_compile.lowering import cpu_kernel

CHECK = Path(__file__).with_name("_format_change_check.py")


def test_every_path_follows_an_edit_of_the_format_constants():
    pytest.importorskip("triton", reason="triton is not installed: no kernel to interpret")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(CHECK.parents[2])}
    env.pop(cpu_kernel.ENV_VAR, None)
    proc = subprocess.run([sys.executable, str(CHECK)], env=env, cwd=CHECK.parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kernel"]["available"], summary
    assert len(summary["checked"]) == 16, summary
    assert sum("inductor decomposition" in paths for *_, paths in summary["checked"]) == 12


def test_the_kernel_source_states_no_format_constant_itself():
    """The C++ reads the format from the defines cpu_kernel.py prepends; built without them it
    refuses to compile instead of guessing."""
    source = Path(cpu_kernel.__file__).with_suffix(".cpp").read_text()
    assert "#ifndef RS_CURVATURE_BITS\n#error" in source
    for name in ("RS_CURVATURE_BITS", "RS_TABLES", "RS_UNIFORM_BITS", "RS_FORMAT_PLANES(X)",
                 "RS_ACT_TOP", "RS_MAX_GROUP_SIZE"):
        assert f"#define {name} " in cpu_kernel.format_defines()
        assert name.removesuffix("(X)") in source.split("#include", 1)[1]
