"""openllm_edu.quantize (chapter 13): int8/int4 rounding against a slow per-group reference and hand-computed rows,
int4 packing, QuantizedLinear against the float layer holding its dequantised weight, the tied head, exact
save/load, generation with the KV cache, and torchao's int8 as the outside reference."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from openllm_edu.core import CourseError
from openllm_edu.generate import GenerationConfig, generate
from openllm_edu.model import GPT, GPTConfig, course_model
from openllm_edu.quantize import (
    QUANTIZATION_FILE,
    QUANTIZED_WEIGHTS,
    QuantizedLinear,
    dequantize,
    dequantize_model,
    has_int8_matmul,
    linear_weight_bytes,
    load_quantized,
    model_tensors,
    pack_int4,
    quantize_asymmetric,
    quantize_model,
    quantize_report,
    quantize_symmetric,
    quantized_layers,
    relative_error,
    save_quantized,
    save_torchao,
    state_bytes,
    torchao_quantize,
    unpack_int4,
)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **{"vocab_size": 256, "block_size": 32, **overrides})).eval()


def tokens(seed: int = 0, shape=(2, 16), vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def slow_symmetric(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    "Group by group with Python loops: q and the scale of each group (group = the whole row for per channel)."
    qmax = 2 ** (bits - 1) - 1
    q, scales = np.zeros_like(w), np.zeros((w.shape[0], w.shape[1] // group))
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            chunk = w[r, g * group:(g + 1) * group]
            scale = np.float32(np.abs(chunk).max()) / np.float32(qmax)
            scales[r, g] = scale
            q[r, g * group:(g + 1) * group] = np.clip(np.round(chunk / scale), -qmax, qmax)
    return q, scales


def test_symmetric_int8_by_hand():
    t = quantize_symmetric(torch.tensor([[-1.0, 0.3, 0.25]]), bits=8)
    # scale 1/127; 0.3 * 127 = 38.1 -> 38, 0.25 * 127 = 31.75 -> 32
    assert t.q.tolist() == [[-127, 38, 32]] and t.q.dtype == torch.int8 and t.zero is None
    assert t.scale.item() == pytest.approx(1 / 127, rel=1e-7)
    assert dequantize(t)[0].tolist() == pytest.approx([-1.0, 38 / 127, 32 / 127], rel=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["channel", 32, 64])
def test_symmetric_matches_the_slow_reference_and_the_half_step_bound(bits, granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 128) * torch.linspace(0.01, 1.0, 6)[:, None]
    t = quantize_symmetric(w, bits, granularity)
    group = 128 if granularity == "channel" else granularity
    q, scales = slow_symmetric(w.numpy(), bits, group)
    assert np.array_equal(t.q.numpy(), q) and t.group_size == group
    np.testing.assert_allclose(t.scale.numpy(), scales, rtol=1e-6)
    half_step = torch.tensor(scales).repeat_interleave(group, dim=1).float() / 2
    assert ((dequantize(t) - w).abs() <= half_step * (1 + 1e-5)).all()


def test_per_tensor_uses_one_scale():
    w = torch.tensor([[0.1, -0.2], [4.0, 0.5]])
    t = quantize_symmetric(w, 8, "tensor")
    assert t.scale.shape == (1, 1) and t.scale.item() == pytest.approx(4.0 / 127)


def test_asymmetric_zero_point_on_an_all_positive_row():
    row = torch.tensor([[0.5, 1.0, 2.0]])
    asym, sym = quantize_asymmetric(row), quantize_symmetric(row)
    # the range [0, 2] (stretched to include 0) onto 0 … 255: step 2/255, and 0.0 is the integer 0
    assert asym.zero.item() == 0 and asym.scale.item() == pytest.approx(2 / 255, rel=1e-7)
    assert asym.q.dtype == torch.uint8 and asym.q[0, [0, 2]].tolist() == [64, 255]  # 0.5 · 127.5 = 63.75 -> 64
    assert (dequantize(asym) - row).abs().max() <= asym.scale.item() / 2
    assert asym.scale.item() < sym.scale.item() / 1.9, "all 256 levels cover the row, not only the positive 128"
    mixed = quantize_asymmetric(torch.tensor([[-1.0, 3.0]]))  # step 4/255; 0.0 is round(1 / (4/255)) = 64
    assert mixed.zero.item() == 64 and mixed.q.tolist() == [[0, 255]]
    assert dequantize(quantize_asymmetric(torch.tensor([[0.0, -0.7, 1.3]])))[0, 0].item() == 0.0


def test_zero_groups_quantise_to_zero():
    w = torch.zeros(2, 64)
    for t in (quantize_symmetric(w, 4, 32), quantize_asymmetric(w, 8, 32)):
        assert torch.equal(dequantize(t), w)


def test_per_channel_beats_per_tensor_on_a_matrix_with_one_large_row():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.02
    w[3] *= 100
    others = [r for r in range(8) if r != 3]
    error = {g: (dequantize(quantize_symmetric(w, 8, g)) - w)[others].norm().item() for g in ("tensor", "channel")}
    assert error["channel"] < error["tensor"] / 20


def test_smaller_groups_give_smaller_error_on_a_trained_weight():
    model, _ = course_model("ci")
    w = model.blocks[1].mlp.c_fc.weight
    errors = [relative_error(w, quantize_symmetric(w, 4, g)) for g in (16, 32, 64, 128)]
    assert errors == sorted(errors) and errors[0] < errors[-1]
    assert relative_error(w, quantize_symmetric(w, 8)) < errors[0] / 8


def test_pack_unpack_every_int4_value():
    every = torch.arange(-8, 8, dtype=torch.int8)
    packed = pack_int4(every)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    assert packed[0].item() == 0x98  # -8 = 0b1000 in the low nibble, -7 = 0b1001 in the high one
    assert packed[4].item() == 0x10  # 0 low, 1 high
    assert torch.equal(unpack_int4(packed), every)
    pairs = torch.cartesian_prod(every, every).to(torch.int8)  # all 256 (low, high) pairs: every byte value once
    assert sorted(pack_int4(pairs).flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, 3], dtype=torch.int8), torch.tensor([8, 0], dtype=torch.int8),
                                 torch.tensor([-9, 0], dtype=torch.int8)])
def test_pack_refuses_odd_lengths_and_values_outside_int4(bad):
    with pytest.raises(CourseError, match="-8 … 7"):
        pack_int4(bad)


@pytest.mark.parametrize("method", ["int8", "int4-g32", "int4-g64"])
def test_quantized_linear_is_the_linear_with_dequantised_weight(method):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    layer = QuantizedLinear.from_linear(linear, method)
    x = torch.randn(3, 7, 128)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), linear.bias))
    bits, group = (8, 128) if method == "int8" else (4, int(method.split("-g")[1]))
    assert layer.qweight.shape == (48, 128 if bits == 8 else 64) and layer.scale.shape == (48, 128 // group)
    # every weight moved by at most half its step, so each output by at most sum_k |x_k| * step_k / 2
    half_step = layer.scale.repeat_interleave(group, dim=1) / 2
    bound = x.abs() @ half_step.T
    assert ((layer(x) - linear(x)).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert not list(layer.parameters()), "a quantised layer does not train"


@pytest.mark.skipif(not has_int8_matmul(), reason="this PyTorch has no int8 matmul on the CPU")
def test_dynamic_int8_is_the_integer_product_rescaled():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = QuantizedLinear.from_linear(linear, "int8-dynamic")
    x = torch.randn(5, 64)
    s_x = x.abs().amax(dim=1, keepdim=True) / 127
    integers = torch.round(x / s_x).double() @ layer.qweight.double().T  # exact in float64
    expected = (integers * s_x.double() * layer.scale[:, 0].double() + linear.bias.double()).float()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer(x[:1]).shape == (1, 24)


def test_quantized_gpt_stays_close_to_fp32_on_the_course_model():
    "Max |logit difference| measured under ci: int8 0.0004, int4-g64 0.005 (logits span -4.6 … 3.0); 10× margins."
    model, _ = course_model("ci")
    idx = tokens(shape=(2, model.config.block_size), vocab=model.config.vocab_size)
    with torch.no_grad():
        reference = model(idx)[0]
        for method, bound in (("int8", 0.005), ("int4-g64", 0.05)):
            q = quantize_model(copy.deepcopy(model), method)
            assert len(quantized_layers(q)) == 4 * model.config.n_layer
            gap = (q(idx)[0] - reference).abs().max().item()
            assert 0 < gap < bound, (method, gap)


def test_the_tied_head_stays_tied_and_float_unless_asked():
    model = tiny_gpt()
    q = quantize_model(copy.deepcopy(model), "int8")
    assert q.lm_head.weight is q.wte.weight and torch.equal(q.wte.weight, model.wte.weight)
    assert "lm_head" not in quantized_layers(q)
    with pytest.raises(CourseError, match="tied"):
        quantize_model(copy.deepcopy(model), "int8", targets=("blocks.*", "lm_head"))
    untied = quantize_model(copy.deepcopy(model), "int4-g32", targets=("blocks.*", "lm_head"), untie_head=True)
    assert isinstance(untied.lm_head, QuantizedLinear) and torch.equal(untied.wte.weight, model.wte.weight)


def test_targets_pick_layers_by_name():
    q = quantize_model(tiny_gpt(), "int8", targets=("attn.c_proj",))
    assert list(quantized_layers(q)) == [f"blocks.{i}.attn.c_proj" for i in range(4)]
    assert type(q.blocks[0].mlp.c_fc) is nn.Linear


@pytest.mark.parametrize("method", ["int8", "int4-g32"])
def test_save_and_load_are_exact(tmp_path, method):
    model, tokenizer = course_model("ci")
    q = quantize_model(copy.deepcopy(model), method)
    save_quantized(q, tmp_path / "q", tokenizer)
    loaded, loaded_tokenizer = load_quantized(tmp_path / "q")
    saved, back = model_tensors(q), model_tensors(loaded)
    assert saved.keys() == back.keys()
    assert all(saved[k].dtype == back[k].dtype and torch.equal(saved[k], back[k]) for k in saved)
    assert loaded.lm_head.weight is loaded.wte.weight
    idx = tokens(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], q(idx)[0])
    assert loaded_tokenizer.encode("To be, or not") == tokenizer.encode("To be, or not")
    assert json.loads((tmp_path / "q" / QUANTIZATION_FILE).read_text())["method"] == method
    assert (tmp_path / "q" / QUANTIZED_WEIGHTS).stat().st_size == state_bytes(q)
    assert not [p for p in (tmp_path / "q").iterdir() if p.name.startswith(".")], "no temporary files left"


def test_an_untied_quantised_head_saves_and_loads(tmp_path):
    q = quantize_model(tiny_gpt(), "int4-g32", targets=("blocks.*", "lm_head"), untie_head=True)
    loaded, tokenizer = load_quantized(save_quantized(q, tmp_path / "q"))
    assert tokenizer is None and isinstance(loaded.lm_head, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(tokens())[0], q(tokens())[0])


def test_missing_or_damaged_files_are_refused_in_one_line(tmp_path):
    q = quantize_model(tiny_gpt(), "int8")
    folder = save_quantized(q, tmp_path / "q")
    weights = (folder / QUANTIZED_WEIGHTS).read_bytes()
    (folder / QUANTIZED_WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CourseError, match="damaged") as damaged:
        load_quantized(folder)
    assert "\n" not in str(damaged.value)
    tensors = {k: v.float() if k.endswith("qweight") else v for k, v in model_tensors(q).items()}
    save_file(tensors, folder / QUANTIZED_WEIGHTS)
    with pytest.raises(CourseError, match="does not fit"):
        load_quantized(folder)
    (folder / QUANTIZATION_FILE).write_text("{not json")
    with pytest.raises(CourseError, match="not valid JSON"):
        load_quantized(folder)
    (folder / QUANTIZATION_FILE).unlink()
    with pytest.raises(CourseError, match=f"{QUANTIZATION_FILE} is missing"):
        load_quantized(folder)
    with pytest.raises(CourseError, match="no quantised layers"):
        save_quantized(tiny_gpt(), tmp_path / "plain")


@pytest.mark.parametrize("method", ["int8", "int4-g32"])
def test_generate_with_the_kv_cache_matches_the_dequantised_float_model(method):
    model, _ = course_model("ci")
    q = quantize_model(copy.deepcopy(model), method)
    prompt = tokens(shape=(2, 5), vocab=model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=20, temperature=0.8, seed=3)
    with_cache = generate(q, prompt, config)
    assert torch.equal(with_cache, generate(dequantize_model(q), prompt, config))
    assert torch.equal(with_cache, generate(q, prompt, config, use_cache=False))
    assert type(dequantize_model(q).blocks[0].attn.c_attn) is nn.Linear


def test_bad_inputs_are_refused():
    with pytest.raises(CourseError, match="unknown quantisation method 'int3'"):
        quantize_model(tiny_gpt(), "int3")
    narrow = tiny_gpt(n_embd=96, n_head=4)  # in_features 96: groups of 64 do not divide it, 32 do
    with pytest.raises(CourseError, match="in_features=96"):
        quantize_model(narrow, "int4-g64")
    assert not quantized_layers(narrow), "nothing swapped before the refusal"
    quantize_model(narrow, "int4-g32")
    with pytest.raises(CourseError, match="already quantised"):
        quantize_model(narrow, "int8")
    with pytest.raises(CourseError, match="matches no nn.Linear"):
        quantize_model(tiny_gpt(), "int8", targets=("attn.q_proj",))
    with pytest.raises(CourseError, match="divides in_features=10"):
        quantize_symmetric(torch.randn(4, 10), 4, 4)
    with pytest.raises(CourseError, match="bits"):
        quantize_symmetric(torch.randn(4, 8), 9)


def test_bytes_and_the_report():
    model, tokenizer = course_model("ci")
    text = "KING RICHARD: Now is the winter of our discontent made glorious summer.\n" * 8
    rows = {r["method"]: r for r in quantize_report(model, tokenizer, ("fp32", "bf16", "int8", "int4-g64"), text)}
    assert rows["fp32"]["delta_vs_fp32"] == 0 and all(r["bits_per_byte"] > 0 for r in rows.values())
    fp32_linear = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n)
    assert rows["fp32"]["linear_bytes"] == fp32_linear and rows["bf16"]["linear_bytes"] == fp32_linear // 2
    assert rows["int8"]["linear_bytes"] <= 0.30 * fp32_linear
    assert 0.13 < rows["int4-g64"]["linear_bytes"] / fp32_linear < 0.16
    assert rows["int4-g64"]["file_bytes"] < rows["int8"]["file_bytes"] < rows["fp32"]["file_bytes"]
    assert linear_weight_bytes(quantize_model(copy.deepcopy(model), "int8")) == rows["int8"]["linear_bytes"]
    with pytest.raises(CourseError, match="needs text"):
        quantize_report(model, tokenizer, ("fp32",), "")


def test_ours_matches_torchao_int8_weight_only():
    "torchao's scale is max|w|/127.5 on -128 … 127, ours max|w|/127 on -127 … 127: equal to within a step."
    pytest.importorskip("torchao")
    model, _ = course_model("ci")
    ours, theirs = quantize_model(copy.deepcopy(model), "int8"), torchao_quantize(copy.deepcopy(model), "int8")
    assert theirs.lm_head.weight is theirs.wte.weight, "we keep torchao off the tied head"
    for name, layer in quantized_layers(ours).items():
        their_weight = theirs.get_submodule(name).weight.dequantize()
        assert ((their_weight - layer.dequantized_weight()).abs() <= layer.scale * 1.0001).all(), name
    idx = tokens(shape=(2, model.config.block_size), vocab=model.config.vocab_size)
    with torch.no_grad():
        gap = (ours(idx)[0] - theirs(idx)[0]).abs().max().item()
    assert gap < 0.01, f"measured 0.0006 under ci; got {gap}"


def test_torchao_dynamic_and_its_default_filter():
    pytest.importorskip("torchao")
    model = tiny_gpt()
    idx = tokens()
    with torch.no_grad():
        reference = model(idx)[0]
        theirs = torchao_quantize(copy.deepcopy(model), "int8-dynamic")(idx)[0]
        assert (theirs - reference).abs().max() < 0.05
        if has_int8_matmul():
            ours = quantize_model(copy.deepcopy(model), "int8-dynamic")(idx)[0]
            assert (ours - theirs).abs().max() < 0.05
    untied = torchao_quantize(copy.deepcopy(model), "int8", keep_tied=False)
    assert untied.lm_head.weight is not untied.wte.weight, "torchao's quantize_ breaks the tie"
    with pytest.raises(CourseError, match="torchao is compared"):
        torchao_quantize(copy.deepcopy(model), "int4-g32")


def test_a_torchao_model_saves_and_loads_exactly(tmp_path):
    pytest.importorskip("torchao")
    model = tiny_gpt()
    theirs = torchao_quantize(copy.deepcopy(model), "int8")
    save_torchao(theirs, tmp_path / "ao", "int8")
    loaded, tokenizer = load_quantized(tmp_path / "ao")
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], theirs(idx)[0]) and tokenizer is None
    assert json.loads((tmp_path / "ao" / QUANTIZATION_FILE).read_text())["method"] == "torchao-int8"
    weights = tmp_path / "ao" / "model.torchao.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as a crash would
    with pytest.raises(CourseError, match="damaged"):
        load_quantized(tmp_path / "ao")
    weights.unlink()
    with pytest.raises(CourseError, match="model.torchao.pt is missing"):
        load_quantized(tmp_path / "ao")


def test_the_module_imports_and_quantises_without_torchao():
    code = ("import sys; sys.modules['torchao'] = None\n"
            "import torch\n"
            "from openllm_edu.core import CourseError\n"
            "from openllm_edu.quantize import quantize_model, torchao_quantize\n"
            "quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), 'int4-g32', targets=('0',))\n"
            "assert 'torchao.quantization' not in sys.modules\n"
            "try:\n    torchao_quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)))\n"
            "except CourseError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "pip install 'openllm-edu[quantize]'" in done.stdout, done.stderr
