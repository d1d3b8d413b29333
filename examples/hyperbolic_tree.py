"""Embed a balanced tree in 2 dimensions: Poincare ball vs Euclidean plane.

A tree's node count grows exponentially with depth, like the area of a hyperbolic disc, while the
Euclidean plane only has polynomial room: a 2-D hyperbolic embedding can keep graph distances,
a 2-D Euclidean one must crush the leaves together. Both embeddings have the same parameters
(2 numbers per node), loss, optimiser, steps and seed; only the distance function differs.

Run:  python examples/hyperbolic_tree.py  [--branching 3 --depth 4 --steps 800]
"""

from __future__ import annotations

import argparse
import time

import torch

from rs_compile.hyperbolic import PoincareBall


def balanced_tree_distances(branching: int, depth: int) -> torch.Tensor:
    """All-pairs shortest-path lengths of the balanced tree (node 0 is the root, BFS order)."""
    parent, level = [-1], [0]
    frontier = [0]
    for d in range(1, depth + 1):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                parent.append(p)
                level.append(d)
                nxt.append(len(parent) - 1)
        frontier = nxt
    n = len(parent)
    ancestors = []  # ancestors[i] = path from i up to the root
    for i in range(n):
        path = [i]
        while parent[path[-1]] >= 0:
            path.append(parent[path[-1]])
        ancestors.append(path)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        up = {a: k for k, a in enumerate(ancestors[i])}
        for j in range(i + 1, n):
            k = next(k for k, a in enumerate(ancestors[j]) if a in up)  # steps from j to the LCA
            dist[i, j] = dist[j, i] = up[ancestors[j][k]] + k
    return dist


def pairwise(points: torch.Tensor, metric) -> torch.Tensor:
    i, j = torch.triu_indices(len(points), len(points), offset=1)
    return metric(points[i], points[j])


def mean_average_precision(emb_dist: torch.Tensor, graph_dist: torch.Tensor) -> float:
    """Graph reconstruction MAP (Nickel & Kiela 2017): rank all nodes by embedded distance from each
    node and average the precision at the rank of each true neighbour."""
    n, aps = len(graph_dist), []
    for i in range(n):
        others = torch.arange(n) != i
        order = emb_dist[i, others].argsort()
        is_nb = (graph_dist[i, others] == 1)[order]
        ranks = torch.nonzero(is_nb).squeeze(1) + 1
        aps.append((torch.arange(1, len(ranks) + 1) / ranks).mean().item())
    return sum(aps) / n


def fit(metric, to_points, n: int, target: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Minimise the mean squared relative distortion mean((d_emb / d_graph - 1)^2) with Adam."""
    g = torch.Generator().manual_seed(seed)
    params = (torch.randn(n, 2, generator=g, dtype=torch.float64) * 1e-2).requires_grad_()
    opt = torch.optim.Adam([params], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((pairwise(to_points(params), metric) / target - 1) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return to_points(params)


def evaluate(points: torch.Tensor, metric, graph_dist: torch.Tensor) -> dict[str, float]:
    n = len(points)
    full = metric(points[:, None, :].expand(n, n, 2), points[None, :, :].expand(n, n, 2))
    i, j = torch.triu_indices(n, n, offset=1)
    rel = (full[i, j] - graph_dist[i, j]).abs() / graph_dist[i, j]
    return {
        "mean_rel_distortion": rel.mean().item(),
        "map": mean_average_precision(full, graph_dist),
    }


def main(branching: int = 3, depth: int = 4, steps: int = 800, seed: int = 0) -> dict[str, dict]:
    graph = balanced_tree_distances(branching, depth)
    n = len(graph)
    i, j = torch.triu_indices(n, n, offset=1)
    target = graph[i, j]
    ball = PoincareBall(1.0)
    models = {
        # Tangent coordinates at the origin mapped by expmap0: plain Adam stays inside the ball.
        "poincare": (ball.dist, ball.expmap0),
        "euclidean": (lambda x, y: (x - y).norm(dim=-1), lambda p: p),
    }
    results = {}
    for name, (metric, to_points) in models.items():
        start = time.perf_counter()
        points = fit(metric, to_points, n, target, steps, seed)
        results[name] = {**evaluate(points, metric, graph), "seconds": time.perf_counter() - start}
    print(
        f"balanced tree: branching {branching}, depth {depth}, {n} nodes, {len(target)} pairs; "
        f"2-D embeddings, {steps} Adam steps each"
    )
    print(f"{'model':<10} {'mean rel. distortion':>21} {'MAP':>7} {'time':>7}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['mean_rel_distortion']:>21.4f} {r['map']:>7.4f} {r['seconds']:>6.1f}s"
        )
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branching", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    torch.set_num_threads(1)  # ~100-wide tensors: threads only add overhead and vary the rounding
    main(**vars(ap.parse_args()))
