"""examples/hyperbolic_tree.py: its tree distances, and that the 2-D hyperbolic embedding wins."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "examples" / "hyperbolic_tree.py"
_spec = importlib.util.spec_from_file_location("hyperbolic_tree", _PATH)
tree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree)


def test_tree_distances_match_floyd_warshall():
    branching, depth = 2, 3
    d = tree.balanced_tree_distances(branching, depth)
    n = len(d)
    fw = torch.full((n, n), float("inf"), dtype=torch.float64)
    fw.fill_diagonal_(0)
    for child in range(1, n):  # BFS numbering: parent of node i is (i - 1) // branching
        fw[child, (child - 1) // branching] = fw[(child - 1) // branching, child] = 1
    for k in range(n):
        fw = torch.minimum(fw, fw[:, k : k + 1] + fw[k : k + 1, :])
    assert torch.equal(d, fw)


def _assert_hyperbolic_wins(results):
    hyp, euc = results["poincare"], results["euclidean"]
    assert hyp["mean_rel_distortion"] < euc["mean_rel_distortion"]
    assert hyp["map"] > euc["map"]


def test_hyperbolic_embedding_beats_euclidean_on_a_small_tree():
    _assert_hyperbolic_wins(tree.main(branching=3, depth=3, steps=300))


@pytest.mark.slow
def test_hyperbolic_embedding_beats_euclidean_with_default_settings():
    _assert_hyperbolic_wins(tree.main())
