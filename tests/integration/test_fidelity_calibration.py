"""convert(model, calibration=...): item forms, sequential encoding, bit allocation, errors."""

import itertools

import pytest
import torch
from torch import nn

import rs_compile
from rs_compile.calibration import ALLOCATION_BITS, Layer, allocate_bits
from rs_compile.config import EncodingConfig


class Mlp(nn.Module):
    """Three linears; ``gain`` scales the hidden features so the first layer's inputs are far from
    isotropic (what GPTQ exploits)."""

    def __init__(self, width=96, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.c = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 32)
        self.register_buffer("gain", torch.logspace(-1, 0.7, width))

    def forward(self, x, shift=0.0):
        return self.c(torch.relu(self.b(torch.relu(self.a(x * self.gain + shift)))))


def inputs(n, seed, width=96):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def output_error(model, reference, x):
    with torch.no_grad():
        ref = reference(x)
        return float((model(x) - ref).square().sum() / ref.square().sum())


def converted(calibration=None, **options):
    return rs_compile.convert(Mlp(), calibration=calibration, **options)


def test_calibration_lowers_the_output_error_on_held_out_inputs():
    reference, held_out = Mlp(), inputs(512, seed=99)
    free = output_error(converted(), reference, held_out)
    calibrated = output_error(converted([(inputs(256, s),) for s in range(4)]), reference, held_out)
    assert calibrated < 0.8 * free


def test_tuple_and_dict_items_are_the_same_calls():
    batches = [inputs(64, s) for s in range(3)]
    by_position = converted([(x, 0.5) for x in batches])
    by_keyword = converted([{"x": x, "shift": 0.5} for x in batches])
    for (name, a), (_, b) in zip(by_position.named_buffers(), by_keyword.named_buffers()):
        assert torch.equal(a, b), name


def test_keyword_arguments_reach_the_model():
    batches = [inputs(64, s) for s in range(3)]
    plain, shifted = converted([(x,) for x in batches]), converted([{"x": x, "shift": 2.0} for x in batches])
    assert not torch.equal(plain.a.codes, shifted.a.codes)


@pytest.mark.parametrize("calibration,match", [
    ([torch.randn(4, 96)], r"item 0 is a Tensor; each item must be a tuple of positional arguments or a dict"),
    ([(torch.randn(4, 96),), [torch.randn(4, 96)]], r"item 1 is a list"),
    (torch.randn(4, 96), r"got a single Tensor; wrap it"),
    ([], r"calibration is empty"),
])
def test_calibration_of_the_wrong_form_is_a_clear_error(calibration, match):
    model = Mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        rs_compile.convert(model, calibration=calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failing_calibration_pass_leaves_the_model_unchanged_and_unhooked():
    model = Mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        rs_compile.convert(model, calibration=[(inputs(8, 0),), (torch.randn(8, 7),)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for m in (model.a, model.b, model.c))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_converted_model_keeps_no_calibration_hooks_and_its_training_mode():
    model = Mlp().train()
    rs_compile.convert(model, calibration=[(inputs(32, 0),)])
    assert model.training and isinstance(model.a, rs_compile.CompressedLinear)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_layers_the_calibration_never_reaches_are_named():
    class Skips(Mlp):
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match=r"never reach layers \['c'\]"):
        rs_compile.convert(Skips(), calibration=[(inputs(8, 0),)])


def test_bit_budget_keeps_the_all_in_size_and_spends_bits_where_they_matter():
    model = converted([(inputs(256, s),) for s in range(2)], bit_budget=4.5)
    rewrites = model.rs_report.linear_rewrites
    stored = sum(r.compressed_bytes for r in rewrites)
    weights = sum(r.out_features * r.in_features for r in rewrites)
    assert 8 * stored / weights <= 4.5
    assert len({r.bits for r in rewrites}) > 1  # not uniform: some layer matters more


def test_bit_budget_needs_calibration_and_a_feasible_size():
    with pytest.raises(ValueError, match="bit_budget=4.5 needs calibration data"):
        converted(bit_budget=4.5)
    with pytest.raises(ValueError, match="below the smallest encoding"):
        converted([(inputs(16, 0),)], bit_budget=2.0)


def test_allocation_is_optimal_for_the_size_it_uses():
    """A Lagrangian solution beats every assignment of no larger size (brute force, 4^4 cases)."""
    shapes = {"p": (64, 64), "q": (128, 64), "r": (64, 192), "s": (32, 64)}
    layers = {n: Layer(nn.Identity(), torch.empty(*shape), None) for n, shape in shapes.items()}
    g = torch.Generator().manual_seed(0)
    sens = {}
    for n in shapes:
        base = float(torch.rand(1, generator=g)) * 10
        sens.update({(n, 3): base * 4.5, (n, 4): base, (n, 5): base / 4, (n, 8): base / 200})
    encoding = EncodingConfig(bit_budget=4.6)
    choice = allocate_bits(layers, sens, encoding)

    def size(c):  # bytes: per row, per group of 32 4 * b code bytes + a group byte, + a bf16 row scale
        return sum(shapes[n][0] * (-(-shapes[n][1] // 32) * (4 * b + 1) + 2) for n, b in c.items())

    def loss(c):
        return sum(sens[n, b] for n, b in c.items())

    weights = sum(l.weight.numel() for l in layers.values())
    assert 8 * size(choice) <= 4.6 * weights
    for bits in itertools.product(ALLOCATION_BITS, repeat=len(shapes)):
        other = dict(zip(shapes, bits))
        if size(other) <= size(choice):
            assert loss(choice) <= loss(other) + 1e-12
