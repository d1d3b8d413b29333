"""Reading Inductor's generated wrapper code in tests (``tests/`` is on sys.path via conftest)."""

import re

import torch


def buffer_sizes(code: str) -> list[int]:
    """numel of every buffer the generated code allocates."""
    sizes = []
    for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code):
        dims = [int(d) for d in shape.replace(" ", "").split(",") if d]
        sizes.append(int(torch.tensor(dims).prod()) if dims else 1)
    return sizes
