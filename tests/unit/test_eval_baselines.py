"""Reference quantizers against their published definitions and plain per-group re-derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rs_compile.eval.baselines import NF4_LEVELS, hqq, int8, nf4, rtn_int4

# bitsandbytes functional.py, get_4bit_type("nf4"), as published.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _weight(out=24, inp=200, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, 10] = 0.9  # an outlier
    w[5, 64:128] = 0.0  # an all-zero group
    return w


def _groups(w, group_size):
    """Yield (row, column slice) per group, the tail group shorter (never padded)."""
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            yield r, slice(start, min(start + group_size, w.shape[1]))


def test_nf4_levels_are_the_published_ones():
    assert list(NF4_LEVELS) == PUBLISHED_NF4


@pytest.mark.parametrize("group_size", [64, 32])
def test_nf4_picks_the_nearest_level_times_absmax(group_size):
    w = _weight()
    w_hat = nf4(w, group_size)
    levels = np.array(PUBLISHED_NF4, dtype=np.float64)
    for r, cols in _groups(w, group_size):
        g, g_hat = w[r, cols].double().numpy(), w_hat[r, cols].double().numpy()
        absmax = np.abs(g).max()
        if absmax == 0:
            assert (g_hat == 0).all()
            continue
        top = np.abs(g).argmax()
        assert g_hat[top] == g[top]  # the absmax element is reproduced exactly
        idx = np.abs(levels[None, :] - (g_hat / absmax)[:, None]).argmin(1)
        np.testing.assert_allclose(g_hat, levels[idx] * absmax, rtol=1e-6, atol=0)  # on the grid
        dist = np.abs(g[:, None] / absmax - levels[None, :])
        assert (dist[np.arange(len(g)), idx] <= dist.min(1) + 1e-6).all()  # and the nearest level


@pytest.mark.parametrize(("fn", "qmax"), [(rtn_int4, 7), (int8, 127)])
def test_symmetric_rtn_matches_plain_derivation(fn, qmax):
    w = _weight()
    w_hat = fn(w, group_size=64)
    want = np.zeros(w.shape)
    for r, cols in _groups(w, 64):
        g = w[r, cols].double().numpy()
        step = np.abs(g).max() / qmax
        want[r, cols] = 0 if step == 0 else np.clip(np.round(g / step), -qmax, qmax) * step
    np.testing.assert_allclose(w_hat.double().numpy(), want, rtol=0, atol=1e-7)


def test_tail_group_is_quantized_on_its_own():
    w = _weight(inp=100)
    for fn in (nf4, rtn_int4, int8, hqq):
        tail_alone = fn(w[:, 64:].contiguous(), group_size=36)
        torch.testing.assert_close(fn(w, group_size=64)[:, 64:], tail_alone, atol=1e-6, rtol=0)


def test_hqq_zero_iterations_is_minmax_rounding():
    w = _weight(inp=128)
    want = np.zeros(w.shape)
    for r, cols in _groups(w, 64):
        g = w[r, cols].double().numpy()
        lo, hi = g.min(), g.max()
        s = (hi - lo) / 15 if hi > lo else 1.0
        z = -lo / s
        want[r, cols] = (np.clip(np.round(g / s + z), 0, 15) - z) * s
    np.testing.assert_allclose(hqq(w, iters=0).double().numpy(), want, rtol=0, atol=1e-6)


def test_hqq_iterations_lower_the_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    start = (hqq(w, iters=0) - w).abs().mean()
    assert (hqq(w, iters=10) - w).abs().mean() < 0.99 * start


@pytest.mark.parametrize("fn", [nf4, rtn_int4, int8, hqq])
def test_invalid_inputs_raise(fn):
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.zeros(64))
    with pytest.raises(ValueError, match="group_size"):
        fn(torch.zeros(4, 64), group_size=0)


def _rtn_layer(seed=0):
    """A weight and correlated inputs with features of very different scales (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 100, generator=g) * 0.05
    x = (torch.randn(512, 100, generator=g) @ (torch.randn(100, 100, generator=g) / 10)
         * torch.logspace(-1, 0.5, 100)).double()
    return w, x


def test_gptq_on_the_rtn_grid_stays_on_the_stored_grid_and_lowers_the_output_error():
    from rs_compile.eval.baselines import gptq, searched_scales

    w, x = _rtn_layer()
    levels = tuple(range(-7, 8))
    hessian = x.T @ x / len(x)
    out_error = lambda w_hat: float((x @ (w - w_hat).double().T).square().sum())  # noqa: E731
    calibrated, free = gptq(w, hessian, levels, 32), searched_scales(w, levels, 32)
    assert calibrated.shape == w.shape and out_error(calibrated) < 0.75 * out_error(free)
    # every group: integers -7..7 times one scale, which some |top| / |level| recovers
    table = torch.tensor(levels, dtype=torch.float64)
    groups = torch.nn.functional.pad(calibrated, (0, 28)).view(-1, 32).double()
    for vals in groups[groups.abs().sum(-1) > 0]:
        scales = vals.abs().max() / torch.arange(1, 8, dtype=torch.float64)
        assert any(((vals / s).unsqueeze(-1) - table).abs().min(-1).values.max() < 1e-4 for s in scales)
