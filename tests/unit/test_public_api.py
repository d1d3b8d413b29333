"""docs/api.md and ``import rs_compile`` agree: every documented name resolves after a plain
``import rs_compile`` (in a fresh interpreter, so no other test's imports help), and every name
``rs_compile.__all__`` exports is documented."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import rs_compile

REPO = Path(__file__).resolve().parents[2]
API = (REPO / "docs" / "api.md").read_text()
FILE_SUFFIXES = {"json", "safetensors"}  # rs_compile.json: a file name, not an attribute


def documented_names() -> set[str]:
    """Dotted ``rs_compile.*`` names anywhere in the page, plus the names that start the code
    lines of a section whose heading names one submodule (``## ...: `rs_compile.hub```)."""
    names = {n.rstrip(".") for n in re.findall(r"\brs_compile(?:\.\w+)+", API)
             if n.rsplit(".", 1)[1] not in FILE_SUFFIXES}
    for section in re.split(r"^## ", API, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        modules = re.findall(r"`(rs_compile\.\w+)`", heading)
        if len(modules) != 1 or len(re.findall(r"`rs_compile[.\w]*`", heading)) != 1:
            continue
        for block in re.findall(r"```python\n(.*?)```", body, flags=re.S):
            for line in block.splitlines():
                for part in line.split("; "):
                    if m := re.match(r"([A-Za-z_][\w.]*)\s*[(:]", part):
                        names.add(f"{modules[0]}.{m.group(1)}")
    return names


def test_every_documented_name_resolves_from_a_plain_import():
    names = sorted(documented_names())
    assert {"rs_compile.models.configs.gpt2", "rs_compile.hub.load_model", "rs_compile.demo.run",
            "rs_compile.compile_for_generation", "rs_compile.EncodingConfig"} <= set(names)
    script = f"""
import functools, json, rs_compile
missing = []
for name in {names!r}:
    try:
        functools.reduce(getattr, name.split(".")[1:], rs_compile)
    except AttributeError as err:
        missing.append(f"{{name}}: {{err}}")
print(json.dumps(missing))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_every_exported_name_is_documented():
    undocumented = [n for n in rs_compile.__all__ if f"rs_compile.{n}" not in API]
    assert undocumented == []


def test_inspect_is_a_function_and_no_module_shadows_the_standard_one():
    import importlib.util
    import inspect as stdlib_inspect

    assert importlib.util.find_spec("rs_compile.inspect") is None
    assert rs_compile.inspect.__module__ == "rs_compile.inspection"
    assert stdlib_inspect.__file__.endswith("inspect.py") and hasattr(stdlib_inspect, "signature")
