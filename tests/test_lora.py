"""openllm_edu.lora (chapter 12): LoRALinear against the slow formula x (W + alpha/r · B A)ᵀ + b, adapters on a GPT
counted by hand, merge/unmerge, merged and adapter files round-tripped, and Hugging Face's peft as the oracle."""
import copy
import json

import pytest
import torch
from torch import nn

from openllm_edu.core import CourseError
from openllm_edu.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    count_trainable,
    linear_names,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from openllm_edu.model import GPT, GPTConfig, load_pretrained, save_pretrained


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **{"vocab_size": 256, "block_size": 32, **overrides})).eval()


def as_if_trained(model: nn.Module, seed: int = 1) -> nn.Module:
    "Give every B a random value, so the adapters change the output."
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    return model


def tokens(seed: int = 0, shape=(2, 16), vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def slow_wrapped_names(model: nn.Module, suffixes) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.endswith("." + s) for s in suffixes)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (8, 3.0)])
def test_lora_linear_is_the_slow_formula(bias, r, alpha):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24, bias=bias)
    lora = LoRALinear(copy.deepcopy(linear), r=r, alpha=alpha)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), linear(x)), "B starts at zero"
    assert torch.count_nonzero(lora.lora_A) == lora.lora_A.numel(), "A starts random"
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ (linear.weight + (alpha / r) * lora.lora_B @ lora.lora_A).T
    if bias:
        expected = expected + linear.bias
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)


def test_scale_is_alpha_over_r_not_alpha():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(8, 8), r=4, alpha=16)
    with torch.no_grad():
        lora.lora_B.fill_(1.0)
        lora.lora_A.fill_(1.0)
    # (B A)[i, j] = sum of r ones = 4; scaled by 16 / 4 = 4, never by 16
    assert torch.equal(lora.delta_weight(), torch.full((8, 8), 16.0))


def test_only_a_and_b_train_and_b_gets_the_first_gradient():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 24), r=4, alpha=8)
    lora(torch.randn(4, 16)).square().sum().backward()
    assert lora.base.weight.grad is None and lora.base.bias.grad is None
    assert torch.count_nonzero(lora.lora_B.grad) > 0, "a random A lets the gradient reach B"
    assert torch.count_nonzero(lora.lora_A.grad) == 0, "B = 0: A's gradient is B^T(...) = 0 at step 0"


def test_dropout_touches_only_the_adapter_path():
    torch.manual_seed(0)
    linear = nn.Linear(16, 16)
    lora = LoRALinear(copy.deepcopy(linear), r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(lora(x), linear(x)), "with B = 0 dropout changes nothing: the base path is never dropped"
    with torch.no_grad():
        lora.lora_B.normal_()
    assert not torch.allclose(lora(x), lora.eval()(x)), "in training the adapter's input is dropped"


def test_merge_unmerge():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(32, 48), r=8, alpha=16)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.1)
    x = torch.randn(5, 32)
    weight, adapted = lora.base.weight.clone(), lora(x)
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(lora(x), adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(lora.base.weight, weight + 2.0 * lora.lora_B @ lora.lora_A, atol=1e-6, rtol=0)
    merged_weight = lora.base.weight.clone()
    lora.merge()
    assert torch.equal(lora.base.weight, merged_weight), "a second merge changes nothing"
    trained_b = lora.lora_B.detach().clone()
    with torch.no_grad():
        lora.lora_B.zero_()
    torch.testing.assert_close(lora(x), adapted, atol=1e-5, rtol=0)  # merged: forward adds no update (none twice)
    with torch.no_grad():
        lora.lora_B.copy_(trained_b)
    lora.unmerge().unmerge()
    assert not lora.merged
    torch.testing.assert_close(lora.base.weight, weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=17), dict(r=2.5), dict(alpha=0), dict(dropout=1.0)])
def test_lora_linear_refuses_bad_settings(bad):
    with pytest.raises(CourseError):
        LoRALinear(nn.Linear(16, 32), **{"r": 4, "alpha": 8, **bad})


@pytest.mark.parametrize("preset", list(LORA_TARGETS))
def test_apply_lora_counts_and_freezes(preset):
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets=preset)
    wrapped = slow_wrapped_names(base, LORA_TARGETS[preset])
    assert sorted(lora_layers(model)) == sorted(wrapped)
    expected = sum(4 * (base.get_submodule(n).in_features + base.get_submodule(n).out_features) for n in wrapped)
    assert count_trainable(model) == expected == sum(p.numel() for p in lora_parameters(model))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{part}" for n in wrapped for part in "AB"}
    idx = tokens()
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_patterns_are_fnmatch_and_suffixes():
    model = apply_lora(tiny_gpt(), targets=["blocks.[02].mlp.*", "1.attn.c_attn"])
    assert sorted(lora_layers(model)) == ["blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj", "blocks.1.attn.c_attn",
                                          "blocks.2.mlp.c_fc", "blocks.2.mlp.c_proj"]


def test_apply_lora_refusals():
    with pytest.raises(CourseError, match=r"'attn\.q_proj' matches no nn\.Linear.*blocks\.\*\.attn\.c_attn"):
        apply_lora(tiny_gpt(), targets=["attn.c_attn", "attn.q_proj"])
    with pytest.raises(CourseError, match="tied"):
        apply_lora(tiny_gpt(), targets=["lm_head"])
    with pytest.raises(CourseError, match="preset"):
        apply_lora(tiny_gpt(), targets="qkv")
    with pytest.raises(CourseError, match="already has LoRA"):
        apply_lora(apply_lora(tiny_gpt()), targets="mlp")
    untied = apply_lora(tiny_gpt(tie_embeddings=False), r=2, targets=["lm_head"])
    assert list(lora_layers(untied)) == ["lm_head"], "an untied head may have an adapter"


def test_merge_lora_gives_an_ordinary_gpt_that_saves_and_loads(tmp_path):
    adapted = as_if_trained(apply_lora(tiny_gpt(), r=4, alpha=8, targets="all"))
    idx = tokens()
    expected = adapted(idx)[0]
    merged = merge_lora(adapted)
    assert not lora_layers(merged) and type(merged.blocks[0].mlp.c_fc) is nn.Linear
    assert set(dict(merged.named_parameters())) == set(dict(tiny_gpt().named_parameters()))
    assert count_trainable(merged) == merged.num_params()
    torch.testing.assert_close(merged(idx)[0], expected, atol=1e-5, rtol=0)
    loaded, _ = load_pretrained(save_pretrained(merged, tmp_path / "merged"))
    assert torch.equal(loaded(idx)[0], merged(idx)[0])


def test_adapter_round_trip(tmp_path):
    adapted = as_if_trained(apply_lora(tiny_gpt(), r=4, alpha=8, targets="attention"))
    save_adapter(adapted, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    settings = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert (settings["r"], settings["alpha"], settings["modules"]) == (4, 8, list(lora_layers(adapted)))
    idx = tokens()
    restored = load_adapter(tiny_gpt(), tmp_path / "a")
    assert torch.equal(restored(idx)[0], adapted(idx)[0])
    again = load_adapter(apply_lora(tiny_gpt(), r=4, alpha=8, targets="attention"), tmp_path / "a")
    assert torch.equal(again(idx)[0], adapted(idx)[0]), "onto a model that already has the same adapters"


def test_adapter_refused_on_another_model(tmp_path):
    save_adapter(apply_lora(tiny_gpt(), r=4, targets="attention"), tmp_path / "a")
    with pytest.raises(CourseError, match=r"n_layer=4 \(model: 2\)"):
        load_adapter(tiny_gpt(n_layer=2), tmp_path / "a")
    with pytest.raises(CourseError, match="differ from the saved ones"):
        load_adapter(apply_lora(tiny_gpt(), r=4, targets="mlp"), tmp_path / "a")
    with pytest.raises(CourseError, match="differ from the saved ones"):
        load_adapter(apply_lora(tiny_gpt(), r=2, targets="attention"), tmp_path / "a")
    with pytest.raises(CourseError, match="missing"):
        load_adapter(tiny_gpt(), tmp_path / "nothing")
    with pytest.raises(CourseError, match="no LoRA adapters"):
        save_adapter(tiny_gpt(), tmp_path / "b")
    model = tiny_gpt(n_embd=64)
    with pytest.raises(CourseError, match=r"n_embd=128 \(model: 64\)"):
        load_adapter(model, tmp_path / "a")
    assert not lora_layers(model), "a refused load leaves the model as it was"
    assert lora_layers(load_adapter(tiny_gpt(dropout=0.1), tmp_path / "a")), "dropout is no part of the weights"


def test_adapter_file_is_small(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))  # the preset's own vocabulary: a realistic embedding share
    save_pretrained(model, tmp_path / "base")
    save_adapter(apply_lora(model, r=8, alpha=16, targets="attention"), tmp_path / "a")
    ratio = (tmp_path / "a" / ADAPTER_WEIGHTS).stat().st_size / (tmp_path / "base" / "model.safetensors").stat().st_size
    assert ratio < 0.05
    with torch.device("meta"):
        small = GPT(GPTConfig.preset("small"))
    for preset in ("attention", "all"):  # float32 both: the file sizes' ratio is the parameters' ratio
        assert count_trainable(apply_lora(copy.deepcopy(small), r=8, targets=preset)) < 0.05 * small.num_params()


def test_training_the_adapters_moves_no_base_weight():
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets="all")
    x = (torch.arange(8 * 17) % 13).view(8, 17)  # a pattern the model can learn in a few steps
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        first = model(x[:, :-1], x[:, 1:])[1].item()
    model.train()
    for _ in range(10):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert model(x[:, :-1], x[:, 1:])[1].item() < first - 0.5
    inside = {n.replace(".base.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(inside[n], p) for n, p in base.named_parameters())


def test_peft_computes_the_same_adapted_model():
    peft = pytest.importorskip("peft", reason="peft is the finetune extra: pip install -e '.[finetune]'")
    base = tiny_gpt()
    ours = as_if_trained(apply_lora(copy.deepcopy(base), r=4, alpha=12, targets="all"))
    config = peft.LoraConfig(target_modules=list(LORA_TARGETS["all"]), r=4, lora_alpha=12, lora_dropout=0.0,
                             init_lora_weights=True)
    theirs = peft.inject_adapter_in_model(config, copy.deepcopy(base)).eval()
    idx = tokens()
    assert torch.equal(theirs(idx)[0], base(idx)[0]), "peft's B starts at zero too"
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert theirs_trainable == count_trainable(ours)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            other = theirs.get_submodule(name)
            assert other.scaling["default"] == layer.scale == 12 / 4
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
    torch.testing.assert_close(ours(idx)[0], theirs(idx)[0], atol=1e-5, rtol=0)
    merged = merge_lora(copy.deepcopy(ours))
    torch.testing.assert_close(merged(idx)[0], theirs(idx)[0], atol=1e-5, rtol=0)
    for name in lora_layers(ours):
        other = theirs.get_submodule(name)
        other.merge()
        torch.testing.assert_close(merged.get_submodule(name).weight, other.base_layer.weight, atol=1e-6, rtol=0)
    assert set(lora_layers(ours)) <= set(linear_names(base))


def quantised_copy(linear: nn.Linear, bnb) -> nn.Module:
    "linear as bitsandbytes' 4-bit (NF4) layer, computing in fp32; the weight is quantised on the move to the CPU."
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def test_qlora_adapters_train_on_a_4bit_base(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # bitsandbytes looks for optional kernels on the Hub; stay offline
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the finetune extra) is not installed")
    full = tiny_gpt()
    model = copy.deepcopy(full)
    for block in model.blocks:
        block.attn.c_attn = quantised_copy(block.attn.c_attn, bnb)
        block.attn.c_proj = quantised_copy(block.attn.c_proj, bnb)
    assert all(block.attn.c_attn.weight.dtype == torch.uint8 for block in model.blocks)  # really stored in 4 bits
    x = tokens()
    with torch.no_grad():
        reference = full(x)[0]
        quantised = model(x)[0]
    apply_lora(model, r=4, alpha=8, targets="attention")
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A.dtype == torch.float32  # the compute dtype, not the stored uint8
    with torch.no_grad():
        assert torch.equal(model(x)[0], quantised)  # B = 0: unchanged at the start
    # 4-bit rounding moves the logits, but far less than their spread
    assert (quantised - reference).abs().max() < 0.5 * reference.std()
    as_if_trained(model)
    _, loss = model(x, x)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)  # gradients reach the adapters only
    assert all(p.grad.abs().sum() > 0 for p in lora_parameters(model))
    with pytest.raises(CourseError, match="quantised base"):
        layer.merge()
