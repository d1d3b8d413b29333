"""Activation-aware encoding on synthetic layers whose inputs are known exactly."""

import pytest
import torch

from rs_compile.codec.calibrate import damped, gptq_encode, inverse_factor, refit_steps
from rs_compile.codec.encode import encode
from rs_compile.codec.format import Format


def layer_and_inputs(n=48, k=160, tokens=1024, seed=0, correlated=True):
    """Trained-like weights and (correlated) inputs whose features have very different scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k**0.5 if correlated else torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) @ mix) * torch.logspace(-1, 0.5, k)
    return w, x.double()


def output_error(x, w, w_hat):
    """||X W^T - X W_hat^T||^2 / ||X W^T||^2 in float64."""
    ref = x @ w.double().T
    return float((ref - x @ w_hat.double().T).square().sum() / ref.square().sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_lowers_the_output_error_against_calibration_free(bits):
    w, x = layer_and_inputs()
    hessian = x.T @ x / len(x)
    free = output_error(x, w, encode(w, Format(bits)).dequantize())
    gptq = output_error(x, w, gptq_encode(w, hessian, Format(bits)).dequantize())
    assert gptq < 0.75 * free
    # the diagonal weighting alone is exact for uncorrelated inputs
    w, x = layer_and_inputs(correlated=False)
    hessian = x.T @ x / len(x)
    free = output_error(x, w, encode(w, Format(bits)).dequantize())
    weighted = output_error(x, w, encode(w, Format(bits), importance=hessian.diagonal().float()).dequantize())
    assert weighted < free


def test_gptq_generalises_to_fresh_inputs_of_the_same_distribution():
    w, x = layer_and_inputs(seed=1)
    _, held_out = layer_and_inputs(seed=1, tokens=2048)  # same mixing and scales, new draws
    held_out = held_out[1024:]
    enc = gptq_encode(w, x.T @ x / len(x))
    assert output_error(held_out, w, enc.dequantize()) < 0.8 * output_error(held_out, w, encode(w).dequantize())


def test_gptq_output_has_the_calibration_free_layout():
    w, x = layer_and_inputs(k=100)  # a padded last group
    enc, free = gptq_encode(w, x.T @ x / len(x)), encode(w)
    for a, b in zip(enc.tensors(), free.tensors()):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert enc.meta() == free.meta()


def test_inverse_factor_is_the_cholesky_factor_of_the_damped_inverse():
    _, x = layer_and_inputs(k=24, tokens=16)  # rank 16 < 24: singular without damping
    h = x.T @ x
    u = inverse_factor(damped(h, 0.1))
    expected = h + 0.1 * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(expected), rtol=1e-8, atol=1e-10)
    assert torch.equal(u, torch.triu(u))


def test_bad_statistics_are_rejected_with_the_reason():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"\[in_features, in_features\] = \[16, 16\]"):
        gptq_encode(w, torch.eye(8))
    with pytest.raises(ValueError, match="all zero"):
        gptq_encode(w, torch.zeros(16, 16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_encode(w, torch.full((16, 16), float("nan")))


def test_step_refit_rounds_the_least_squares_optimum_of_the_output_error():
    """Against an independent float64 solve: per row, ``min_s ||L (w - B s)||^2`` with ``H = L L^T``
    and ``B`` the [in, groups] matrix of each group's levels; the refit is its rounding to steps."""
    w, x = layer_and_inputs(n=6, k=40)  # groups of 16: 3 per row, the last one padded
    h = x.T @ x / len(x)
    g, ng = 16, 3
    units = torch.randn(6, ng, g, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    units[:, -1, 40 - 32:] = 0.0  # padded inputs carry zero levels
    unit = torch.full((6,), 1e-4, dtype=torch.float64)  # fine steps: rounding barely moves the optimum
    got = refit_steps(w, units, torch.ones(6, ng, dtype=torch.int32), unit, 10**6, h)
    chol = torch.linalg.cholesky(h)
    for r in range(6):
        basis = torch.zeros(40, ng, dtype=torch.float64)
        for j in range(ng):
            cols = slice(j * g, min((j + 1) * g, 40))
            basis[cols, j] = units[r, j, : cols.stop - cols.start]
        best = torch.linalg.lstsq(chol.T @ basis, chol.T @ w[r].double().unsqueeze(-1)).solution.squeeze(-1)
        assert torch.equal(got[r].double(), torch.round(best / 1e-4))


def test_step_refit_never_raises_a_rows_output_error_and_respects_the_step_range():
    w, x = layer_and_inputs(n=8, k=64)
    h = x.T @ x / len(x)
    units = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    unit = torch.full((8,), 2e-3, dtype=torch.float64)
    good = refit_steps(w, units, torch.ones(8, 4, dtype=torch.int32), unit, 31, h)
    poor = torch.randint(-31, 32, (4, 4), generator=torch.Generator().manual_seed(6), dtype=torch.int32)
    starts = torch.cat([good[:4], poor])

    def row_errors(s):
        r = w.double() - (unit[:, None, None] * s.double().unsqueeze(-1) * units).view(8, 64)
        return ((r @ h) * r).sum(-1)

    out = refit_steps(w, units, starts, unit, 31, h)
    assert out.dtype == torch.int32 and int(out.abs().max()) <= 31
    assert bool((row_errors(out) <= row_errors(starts)).all())
    assert torch.equal(out[:4], starts[:4])  # nothing to gain: kept as they were
    assert bool((row_errors(out)[4:] < row_errors(starts)[4:]).all())
