"""The two option sets: EncodingConfig (the stored bytes) and CompileConfig (how a model runs),
their errors, and the flat keywords of convert / backend / torch.compile routed to them."""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import rs_compile
from rs_compile.config import CompileConfig, EncodingConfig, split_options

ENCODING = ["bits", "group_size", "curvatures", "embeddings", "embedding_bits", "min_features",
            "compress_tied", "gptq", "gptq_damp", "bit_budget"]
COMPILE = ["attention", "fuse_qkv", "act_bits", "frozen_weights"]


def test_each_option_lives_in_exactly_one_config():
    assert EncodingConfig.option_names() == ENCODING
    assert CompileConfig.option_names() == COMPILE


def test_the_user_guide_table_lists_exactly_the_options_of_both_configs():
    guide = (Path(__file__).parents[2] / "docs" / "user-guide.md").read_text()
    tables = re.findall(r"^\| `(\w+)` \|", guide, flags=re.M)
    assert sorted(tables) == sorted(ENCODING + COMPILE)


@pytest.mark.parametrize("cls, key, valid", [(EncodingConfig, "act_bits", ENCODING),
                                             (CompileConfig, "bits", COMPILE)])
def test_a_config_rejects_the_other_configs_keys_listing_its_own(cls, key, valid):
    with pytest.raises(ValueError, match=re.escape(
            f"unknown {cls.__name__} option(s) ['{key}']; valid options are {valid}")):
        cls.from_options(None, {key: 8})


def test_split_options_routes_each_keyword_and_keeps_the_bases_other_fields():
    base = EncodingConfig(group_size=64)
    encoding, compiled = split_options({"bits": 8, "act_bits": 8, "attention": False}, base)
    assert encoding == EncodingConfig(bits=8, group_size=64)
    assert compiled == CompileConfig(act_bits=8, attention=False)


def test_an_unknown_keyword_lists_both_sets():
    with pytest.raises(ValueError) as err:
        split_options({"bitz": 4, "act_bit": 8})
    message = str(err.value)
    assert "unknown rs_compile option(s) ['act_bit', 'bitz']" in message
    assert str(ENCODING) in message and str(COMPILE) in message


def test_a_config_of_the_wrong_kind_is_a_type_error():
    with pytest.raises(TypeError, match="expected an EncodingConfig or None, got CompileConfig"):
        split_options(None, CompileConfig())


@pytest.mark.parametrize("cls, options, message", [
    (CompileConfig, {"act_bits": 4}, r"act_bits=4 is invalid; valid values are \(0, 8\)"),
    (CompileConfig, {"attention": 1}, "attention=1 is invalid; it must be True or False"),
    (EncodingConfig, {"embeddings": "yes"}, "embeddings='yes' is invalid; it must be True or False"),
    (EncodingConfig, {"curvatures": 5}, r"curvatures=5 is invalid; valid range is 1\.\.4"),
    (EncodingConfig, {"embedding_bits": 6}, r"embedding_bits=6 is not supported"),
])
def test_invalid_values_name_the_option_and_its_valid_range(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_convert_takes_both_configs_and_keywords_over_them():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    rs_compile.convert(model, EncodingConfig(bits=8, group_size=64), CompileConfig(act_bits=8),
                       group_size=32)
    layers = [m for m in model if isinstance(m, rs_compile.CompressedLinear)]
    assert [(m.bits, m.group_size, m.act_bits) for m in layers] == [(8, 32, 8)] * 2


def test_backend_options_reach_their_configs_and_equal_options_share_one_backend():
    backend = rs_compile.backend(bits=8, fuse_qkv=False)
    assert backend is rs_compile.backend(fuse_qkv=False, bits=8)
    assert backend.encoding == EncodingConfig(bits=8)
    assert backend.compile_config == CompileConfig(fuse_qkv=False)


def test_torch_compile_options_route_to_both_configs():
    """bits (EncodingConfig) and act_bits (CompileConfig) given as torch.compile options give what
    convert gives with the same keywords, and not what it gives without act_bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    x = torch.randn(2, 64)
    converted = {a: rs_compile.convert(copy.deepcopy(model), bits=8, act_bits=a) for a in (0, 8)}
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend="realitystone", options={"bits": 8, "act_bits": 8})(x)
        expected = {a: m(x) for a, m in converted.items()}
    torch.testing.assert_close(y, expected[8], rtol=1e-5, atol=1e-6)
    assert (y - expected[0]).abs().max() > 100 * (expected[8] - y).abs().max() + 1e-4
