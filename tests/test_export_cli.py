"""`openllm-edu export` on the cached ci course model: each format's folder is what the library's exporter writes,
loads in the runtime it targets (transformers, ONNX Runtime, the gguf reader) with the logits the command reports,
and bad input is one line, exit 2, with nothing written."""
import re

import pytest
import torch

from openllm_edu.cli import main
from openllm_edu.model import GPT, GPTConfig, course_model, course_model_dir, save_pretrained

pytest.importorskip("transformers", reason="the export extra (transformers, onnxruntime, gguf) checks the exports")
pytest.importorskip("onnxruntime", reason="the export extra (transformers, onnxruntime, gguf) checks the exports")
pytest.importorskip("gguf", reason="the export extra (transformers, onnxruntime, gguf) checks the exports")


@pytest.fixture(autouse=True)
def ci_profile(monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_PROFILE", "ci")


@pytest.fixture(scope="module")
def checkpoint():
    course_model("ci")
    return course_model_dir("ci")


def reported_difference(printed: str) -> float:
    return float(re.search(r"max \|logit difference\| (\S+) on", printed).group(1))


def held_out_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)[0]


def test_hf_export_loads_in_transformers_with_our_logits(checkpoint, tmp_path, capsys):
    import transformers

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "hf", "--out", str(out)]) == 0
    assert reported_difference(capsys.readouterr().out) == 0.0
    model, tokenizer = course_model("ci")
    ids = torch.tensor([tokenizer.encode("KING HENRY. Once more unto the breach, dear friends")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, held_out_logits(model, ids))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto("To be, or not to be")["input_ids"] == tokenizer.encode("To be, or not to be")
    assert f"{model.num_params():,}" in (out / "README.md").read_text()  # the model card states the real size


def test_onnx_and_gguf_exports_load_in_their_runtimes(checkpoint, tmp_path, capsys):
    from openllm_edu.gguf_export import read_gguf
    from openllm_edu.onnx_export import onnx_logits

    model, _ = course_model("ci")
    ids = torch.randint(0, model.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(3))
    ours = held_out_logits(model, ids)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o")]) == 0
    assert reported_difference(capsys.readouterr().out) < 1e-4
    assert (torch.from_numpy(onnx_logits(tmp_path / "o", ids)) - ours).abs().max() < 1e-4
    for dtype, tolerance in (("f32", 0.0), ("q8_0", 0.05)):
        out = tmp_path / f"g-{dtype}"
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "gguf", "--dtype", dtype,
                     "--out", str(out)]) == 0
        assert reported_difference(capsys.readouterr().out) <= tolerance
        back, _ = read_gguf(out)
        assert (held_out_logits(back, ids) - ours).abs().max() <= tolerance


def test_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, capsys):
    rope = save_pretrained(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, pos="rope",
                                         norm="layernorm")), tmp_path / "rope-layernorm")
    assert main(["quantize", "--checkpoint", str(checkpoint), "--method", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    (tmp_path / "taken").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--format", "hf"], "config.json is missing"),
        (["--checkpoint", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "taken")], "already exists"),
        (["--checkpoint", str(tmp_path / "q"), "--format", "hf"], "quantised model"),
        (["--checkpoint", str(tmp_path / "q"), "--format", "onnx"], "quantised model"),
        (["--checkpoint", str(checkpoint), "--format", "hf", "--dtype", "q8_0"], "is for --format gguf"),
        (["--checkpoint", str(checkpoint), "--format", "gguf", "--dtype", "q4"], "dtype='q4'"),
        (["--checkpoint", str(rope), "--format", "hf"], "norm="),
        (["--checkpoint", str(rope), "--format", "gguf"], "norm="),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "new")]
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "rope-layernorm", "taken"]  # nothing half-written
    with pytest.raises(SystemExit) as exit:
        main(["export", "--checkpoint", str(checkpoint), "--format", "tflite", "--out", str(tmp_path / "new")])
    assert exit.value.code == 2
