"""`openllm-edu quantize` and `bench quantize` on the cached ci course model: the folder holds the model that
quantize_model (or torchao) makes, generate reads it, a crowded --out is left alone, bad input is one line, exit 2."""
import copy
import json

import pytest
import torch

from openllm_edu.cli import main
from openllm_edu.model import course_model, course_model_dir
from openllm_edu.quantize import QUANTIZATION_FILE, load_quantized, quantize_model, torchao_quantize


@pytest.fixture(autouse=True)
def ci_profile(monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_PROFILE", "ci")


@pytest.fixture(scope="module")
def checkpoint():
    course_model("ci")
    return course_model_dir("ci")


def logits(model, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("method", ["int8", "int4-g32", "torchao-int8"])
def test_quantize_writes_the_model_quantize_model_makes(checkpoint, method, tmp_path, capsys):
    if method.startswith("torchao"):
        pytest.importorskip("torchao")
    out = tmp_path / method
    assert main(["quantize", "--checkpoint", str(checkpoint), "--method", method, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "of fp32's bytes" in printed
    model, tokenizer = course_model("ci")
    expected = (torchao_quantize(copy.deepcopy(model), "int8") if method.startswith("torchao")
                else quantize_model(copy.deepcopy(model), method))
    loaded, loaded_tokenizer = load_quantized(out)
    assert torch.equal(logits(loaded), logits(expected))
    assert loaded_tokenizer.encode("To be, or not") == tokenizer.encode("To be, or not")
    assert json.loads((out / QUANTIZATION_FILE).read_text())["method"] == method
    assert main(["generate", "--checkpoint", str(out), "--prompt", "KING", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("KING")
    assert main(["quantize", "--checkpoint", str(checkpoint), "--method", method, "--out", str(out)]) == 0  # replaced


def test_bench_quantize_on_a_preset_prints_every_method(capsys):
    assert main(["bench", "quantize", "--preset", "tiny", "--block", "32", "--methods", "fp32", "int8", "int4-g64",
                 "--new-tokens", "4", "--batch", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["fp32", "int8", "int4-g64"]
    assert "int8 linear bytes 25." in table[-1] and "bits/byte" not in table[-1]  # no quality on random weights


def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("keep me")
    damaged = tmp_path / "damaged"
    assert main(["quantize", "--checkpoint", str(checkpoint), "--out", str(damaged)]) == 0
    (damaged / "model.quantized.safetensors").write_bytes(b"not safetensors")
    quantize = ["quantize", "--checkpoint", str(checkpoint), "--out"]
    cases = {"unknown --method 'int5'": [*quantize, str(tmp_path / "a"), "--method", "int5"],
             "holds other files": [*quantize, str(crowded)],
             "no saved model": ["quantize", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
             "is damaged": ["generate", "--checkpoint", str(damaged), "--prompt", "x"],
             "--repeats 0": ["bench", "quantize", "--preset", "tiny", "--repeats", "0"],
             "unknown model preset": ["bench", "quantize", "--preset", "huge"]}
    for words, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and words in err, (argv, err)
    assert (crowded / "notes.txt").read_text() == "keep me" and not (tmp_path / "a").exists()
