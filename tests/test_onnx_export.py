"""openllm_edu.onnx_export (chapter 14b): our GPT as ONNX graphs, run by ONNX Runtime.

ONNX Runtime is the oracle: the exported graphs, run with no code of ours, must give PyTorch's logits within 1e-4
(about 1e-6 expected in float32) at 1 and 2 tokens (sizes the tracer treats as special), an odd length and the whole
context, and our greedy tokens through the KV-cache graph. Each model is exported once per module: exports take
seconds."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is in the export extra; install it to check ONNX exports")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the export extra)")

from openllm_edu.core import CourseError  # noqa: E402
from openllm_edu.generate import GenerationConfig, generate  # noqa: E402
from openllm_edu.lora import apply_lora  # noqa: E402
from openllm_edu.model import GPT, GPTConfig, course_model, save_pretrained  # noqa: E402
from openllm_edu.onnx_export import (  # noqa: E402
    CACHE_MODEL_FILE,
    MODEL_FILE,
    empty_past,
    export_onnx,
    max_abs_difference,
    onnx_generate,
    onnx_session,
    read_config,
)
from openllm_edu.quantize import quantize_model  # noqa: E402
from openllm_edu.tokenizer import load_tokenizer  # noqa: E402

LOGIT_TOLERANCE = 1e-4
LLAMA_SHAPE = dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False, tie_embeddings=False, window=16)
SPEEDRUN_SHAPE = dict(qk_norm=True, mlp="relu2", pos="rope", norm="rmsnorm", bias=False, tie_embeddings=False)  # no HF class


def random_gpt(**overrides) -> GPT:
    "A small GPT whose every tensor (biases and norm gains included) is random, so no mapping hides behind 1 or 0."
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=4, n_embd=64, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, tokenizer or None, export folder): GPT-2-shaped, Llama-shaped with a window, QK-norm with
    ReLU² (which no Hugging Face class holds, but a traced graph does), the ci course model."""
    root = tmp_path_factory.mktemp("onnx")
    gpt2, llama, speedrun = random_gpt(), random_gpt(**LLAMA_SHAPE), random_gpt(**SPEEDRUN_SHAPE)
    course, tokenizer = course_model("ci")
    saved = save_pretrained(course, root / "course-saved", tokenizer)
    return {"gpt2": (gpt2, None, export_onnx(gpt2, root / "gpt2")),
            "llama-window": (llama, None, export_onnx(llama, root / "llama")),
            "qk-norm-relu2": (speedrun, None, export_onnx(speedrun, root / "speedrun")),
            "course": (course, tokenizer, export_onnx(saved, root / "course"))}  # from a folder, tokenizer included


MODELS = ["gpt2", "llama-window", "qk-norm-relu2", "course"]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runtime_gives_our_logits_at_every_shape(exported, name):
    model, _, folder = exported[name]
    session = onnx_session(folder)
    block = model.config.block_size
    for shape in [(1, 1), (1, 2), (2, 37), (3, block)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(sum(shape)))
        difference = max_abs_difference(model, session, ids)
        assert difference <= LOGIT_TOLERANCE, f"{name} {shape}: max |logit difference| {difference}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_through_the_cache_graph_is_ours(exported, name):
    model, tokenizer, folder = exported[name]
    eos_id = tokenizer.eos_id if tokenizer is not None else None
    prompt = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=eos_id is not None)
    ours = generate(model, prompt, config, eos_id=eos_id)
    theirs = onnx_generate(folder, prompt, 20, eos_id=eos_id)
    assert theirs.tolist() == ours.tolist()
    if eos_id is None:
        assert theirs.shape == (2, 28)


def test_the_cache_graph_in_uneven_steps_gives_the_whole_texts_logits(exported):
    model, _, folder = exported["llama-window"]  # the window (16) is shorter than the text: the mask must shift
    session = onnx_session(folder, CACHE_MODEL_FILE)
    text = torch.randint(0, 300, (3, 30), generator=torch.Generator().manual_seed(6))
    keys = values = empty_past(model.config, 3)
    pieces = []
    for start, end in ((0, 1), (1, 3), (3, 20), (20, 21), (21, 30)):
        logits, keys, values = session.run(None, dict(input_ids=text[:, start:end].numpy(), past_keys=keys,
                                                      past_values=values))
        pieces.append(logits)
    with torch.no_grad():
        whole = model(text)[0].numpy()
    assert np.abs(np.concatenate(pieces, axis=1) - whole).max() <= LOGIT_TOLERANCE
    assert keys.shape == (2, 3, 2, 30, 16)


def test_the_folder_holds_our_config_and_a_working_tokenizer(exported):
    model, tokenizer, folder = exported["course"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", MODEL_FILE, CACHE_MODEL_FILE,
                                                               "tokenizer"])
    assert read_config(folder) == model.config
    assert json.loads((folder / "config.json").read_text())["model_type"] == "openllm_edu.gpt"
    text = "Now is the winter of our discontent"
    assert load_tokenizer(folder / "tokenizer").encode(text) == tokenizer.encode(text)
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temporary folder left


def test_generation_past_the_context_is_refused(exported):
    model, _, folder = exported["gpt2"]
    with pytest.raises(CourseError, match="block_size=40"):
        onnx_generate(folder, [[1] * 30], 11)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("change", ["lora", "int8", "bf16"])
def test_adapters_quantised_layers_and_other_dtypes_are_refused_leaving_nothing(tmp_path, change):
    model = random_gpt()
    model = {"lora": lambda: apply_lora(model, r=4), "int8": lambda: quantize_model(model, "int8"),
             "bf16": lambda: model.to(torch.bfloat16)}[change]()
    with pytest.raises(CourseError) as refused:
        export_onnx(model, tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert leftovers(tmp_path) == []


def test_an_existing_folder_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CourseError, match="already exists"):
        export_onnx(random_gpt(), tmp_path / "out")
    assert leftovers(tmp_path) == ["out"] and leftovers(tmp_path / "out") == ["notes.txt"]
