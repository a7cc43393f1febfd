"""The length-extrapolation study: SinusoidalPositionalEncoding against the article's formula,
the data split, and a ``--quick`` run end to end (no number of the study is asserted)."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from posenc_triton import SinusoidalPositionalEncoding
from posenc_triton.bench import bench_extrapolation as study
from posenc_triton.bench import extrapolation_lm as lm
from posenc_triton.bench import run as bench_run


def _formula(positions, d_model, base=10000.0):
    """PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(p / base^(2i/d)), in Python floats."""
    return torch.tensor([[math.sin(p / base ** (2 * (j // 2) / d_model)) if j % 2 == 0 else
                          math.cos(p / base ** (2 * (j // 2) / d_model))
                          for j in range(d_model)] for p in positions], dtype=torch.float64)


@pytest.mark.parametrize("d_model", [40, 7, 2])
@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_sinusoidal_encoding_matches_formula(d_model, base):
    positions = torch.tensor([0, 1, 2, 37, 511, 4095, 100003])
    module = SinusoidalPositionalEncoding(d_model, base=base)
    expected = _formula(positions.tolist(), d_model, base)
    exact = module.encoding(positions, torch.float64)
    torch.testing.assert_close(exact, expected, rtol=0, atol=1e-9)  # float64 angles
    table = module.encoding(positions)
    assert table.dtype == torch.float32
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-6)  # rounded once
    torch.testing.assert_close(module.encoding(positions.view(7, 1)), table.view(7, 1, d_model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sinusoidal_forward_adds_encoding(dtype):
    torch.manual_seed(0)
    module = SinusoidalPositionalEncoding(40)
    x = torch.randn(3, 13, 40, dtype=dtype)
    compute = torch.promote_types(dtype, torch.float32)
    expected = (x.to(compute) + _formula(range(13), 40).to(compute)).to(dtype)
    out = module(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)
    # Per-token positions, [S] and [B, S] (e.g. a decode step at position 100).
    pos = torch.tensor([[5, 6, 7], [100, 101, 102]])
    y = torch.randn(2, 3, 40, dtype=dtype)
    out = module(y, position_ids=pos)
    for b in range(2):
        expected = (y[b].to(compute) + _formula(pos[b].tolist(), 40).to(compute)).to(dtype)
        torch.testing.assert_close(out[b], expected)
    torch.testing.assert_close(module(y, position_ids=pos[1]), module(y, position_ids=pos[[1, 1]]))
    assert not torch.equal(module(x), x)


def test_sinusoidal_rejects_bad_input():
    module = SinusoidalPositionalEncoding(8)
    for d_model in (0, -2, 8.0, True):
        with pytest.raises(ValueError, match="d_model"):
            SinusoidalPositionalEncoding(d_model)
    with pytest.raises(ValueError, match="base"):
        SinusoidalPositionalEncoding(8, base=-1.0)
    with pytest.raises(TypeError, match="base"):
        SinusoidalPositionalEncoding(8, base="10000")
    with pytest.raises(ValueError, match=r"x must be \[B, S, d_model=8\]"):
        module(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="x must be"):
        module(torch.randn(3, 8))
    with pytest.raises(TypeError, match="floating"):
        module(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        module(torch.randn(2, 3, 8), position_ids=torch.arange(3.0))
    with pytest.raises(ValueError, match="position_ids must be"):
        module(torch.randn(2, 3, 8), position_ids=torch.arange(4))
    with pytest.raises(TypeError, match="position_ids"):
        module(torch.randn(2, 3, 8), position_ids=[0, 1, 2])


def test_split_is_by_file_name_and_deterministic(tmp_path):
    names = [f"mod{i}.py" for i in range(40)]
    for i, name in enumerate(reversed(names)):  # creation order must not matter
        (tmp_path / name).write_bytes(f"# file {name} {i}\n".encode())
    (tmp_path / "notes.txt").write_bytes(b"not python")
    train, held, info = lm.stdlib_split(tmp_path)
    held_names = sorted(n for n in names if lm.is_held_out(n))
    assert 0 < len(held_names) < len(names) and info["held_out_files"] == held_names
    expected = b"".join((tmp_path / n).read_bytes() for n in held_names)
    assert bytes(held.tolist()) == expected
    expected = b"".join((tmp_path / n).read_bytes() for n in sorted(names) if n not in held_names)
    assert bytes(train.tolist()) == expected
    with pytest.raises(ValueError, match="no standard-library source"):
        lm.stdlib_split(tmp_path / "empty")


def test_stdlib_split_is_fixed():
    first, second = lm.stdlib_split(), lm.stdlib_split()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2] == second[2]
    info = first[2]
    assert all(lm.is_held_out(n) for n in info["held_out_files"])
    assert info["train_files"] > 5 * len(info["held_out_files"]) > 0
    assert info["held_out_bytes"] > study.PRESETS["large"]["eval_tokens"]


def test_rejects_bad_settings():
    for argv in (["--heads", "3"], ["--factors", "0,2"], ["--steps", "0"], ["--lr", "0"],
                 ["--quick", "--large"]):
        with pytest.raises(SystemExit):
            study.parse_settings(argv)
    s, _ = study.parse_settings(["--quick", "--factors", "1,3", "--seeds", "2"])
    assert s.factors == (1, 3) and s.seeds == 2 and s.train_len == 32


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    """``posenc-bench extrapolation --quick``: every encoding trains and its loss falls, every
    evaluation is finite, the files are written, the interpreter setting is restored."""
    monkeypatch.setattr(sys, "argv", ["posenc-bench", "extrapolation", "--quick", "--out",
                                      str(tmp_path), "--factors", "1,2,4"])
    interpret = os.environ.get("TRITON_INTERPRET")
    assert bench_run.cli() == 0
    assert os.environ.get("TRITON_INTERPRET") == interpret
    data = json.loads((tmp_path / "extrapolation.json").read_text())
    assert data["environment"]["settings"]["factors"] == [1, 2, 4]
    training = [r for r in data["rows"] if r["kind"] == "training"]
    assert sorted(r["encoding"] for r in training) == sorted(study.ENCODINGS)
    for r in training:
        assert r["loss_end"] < r["loss_start"] - 0.5, r["encoding"]
    evals = [r for r in data["rows"] if r["kind"] == "eval"]
    assert {(r["encoding"], r["eval_len"]) for r in evals} == {
        (label, 32 * f) for label, _, _ in study.VARIANTS for f in (1, 2, 4)}
    for r in evals:
        assert math.isfinite(r["bpb"]) and 0 < r["bpb"] < 9, r
        assert (r["bpb_beyond"] is None) == (r["eval_len"] == 32), r
        assert r["bpb_beyond"] is None or math.isfinite(r["bpb_beyond"]), r
    table = (tmp_path / "extrapolation.md").read_text()
    assert all(f"| {label} |" in table for label, _, _ in study.VARIANTS)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "extrapolation.png").stat().st_size > 0
    # --resume: a run cut short after four models trains only the fifth, keeping the rest.
    path = tmp_path / "extrapolation.json"
    data["rows"] = [r for r in data["rows"] if r.get("encoding") not in ("alibi",)]
    path.write_text(json.dumps(data))
    argv = ["--quick", "--out", str(tmp_path), "--factors", "1,2,4", "--resume"]
    assert study.main(argv) == 0
    resumed = json.loads(path.read_text())["rows"]
    assert [r for r in resumed if r.get("encoding") != "alibi"] == data["rows"]
    assert sorted(r["encoding"] for r in resumed if r["kind"] == "training") == sorted(
        study.ENCODINGS)
    assert {r["eval_len"] for r in resumed if r["kind"] == "eval" and r["encoding"] == "alibi"} == {
        32, 64, 128}
    with pytest.raises(ValueError, match="other settings"):
        study.main([*argv, "--steps", "41"])


@pytest.mark.filterwarnings("ignore:.*materialises:UserWarning")  # the CPU path, as meant
def test_models_and_rope_scaling(monkeypatch):
    """Every model runs past its training length; a scaled RoPE copy keeps the weights (1x
    at the training length is the trained model, 4x moves the logits); scaling is RoPE's alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the layers' PyTorch path, as in the study
    s, _ = study.parse_settings(["--quick"])
    tokens = torch.randint(0, 256, (2, 3 * s.train_len))
    for enc in lm.ENCODINGS:
        torch.manual_seed(0)
        model = study._model(enc, s)
        logits = model(tokens)
        assert logits.shape == (2, 3 * s.train_len, 256) and torch.isfinite(logits).all(), enc
    layers = {type(b.attn).__name__ for b in model.blocks}
    assert layers == {"ALiBiAttention"}
    rope = study._model("rope", s)
    assert {type(b.attn).__name__ for b in rope.blocks} == {"RoPEAttention"}
    with torch.no_grad():
        base = rope(tokens)
        for rule in ("linear", "ntk", "dynamic", "yarn"):
            # At 1x (the training length: ntk and dynamic scale by the length seen).
            same = study.evaluated_model(rope, rule, 1, s, torch.device("cpu"))
            short = tokens[:, : s.train_len]
            torch.testing.assert_close(same(short), rope(short), rtol=1e-6, atol=1e-6)
            scaled = study.evaluated_model(rope, rule, 4, s, torch.device("cpu"))
            assert scaled.blocks[0].attn.rotary.scaling == lm.rope_scaling(rule, 4, s.train_len)
            assert not torch.allclose(scaled(tokens)[:, 1:], base[:, 1:], atol=1e-4), rule
    with pytest.raises(ValueError, match="scaling applies"):
        lm.ByteLM("alibi", 32, 32, 1, 2, scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="encoding must be one of"):
        lm.ByteLM("t5", 32, 32, 1, 2)
