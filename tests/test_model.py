"""Behaviour of openllm_edu.model: parameter and FLOP formulas against real models and PyTorch's FLOP counter,
the loss at initialisation, gradient checkpointing, the KV cache, torch.compile, saving and loading, and bad
input as a CourseError naming the field and the fix."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from openllm_edu.core import CourseError
from openllm_edu.model import (
    GPT,
    IGNORE_INDEX,
    PRESETS,
    GPTConfig,
    ReLUSquaredMLP,
    SwiGLUMLP,
    estimate_num_params,
    flops_per_token,
    load_pretrained,
    param_breakdown,
    save_pretrained,
    swiglu,
)
from openllm_edu.tokenizer import CharTokenizer

SMALL_SHAPE = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32)
RECIPES = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, n_kv_head=2),
    "rope-window": dict(pos="rope", window=5, n_kv_head=1),
    "qk-norm-relu2": dict(qk_norm=True, mlp="relu2", pos="rope", bias=False, n_kv_head=2),
}


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.preset("tiny", **{"vocab_size": 128, "block_size": 32, **overrides})


def meta_num_params(config: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_params()


# ------------------------------------------------------------------ parameter counts
def test_small_preset_is_the_original_projects_model():
    config = GPTConfig.preset("small")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (6, 8, 512, 1024, 32000)
    assert (config.bias, config.norm, config.mlp, config.pos, config.tie_embeddings) == (True, "layernorm", "gelu", "learned", True)
    assert estimate_num_params(config) == GPT(config).num_params() == 35_823_616


@pytest.mark.parametrize("name", list(PRESETS))
def test_formula_equals_real_count_for_every_preset(name):
    config = GPTConfig.preset(name)
    assert estimate_num_params(config) == meta_num_params(config)


def test_formula_matches_published_counts():
    assert estimate_num_params(GPTConfig.preset("gpt2-124m", vocab_size=50257)) == 124_439_808  # GPT-2
    assert estimate_num_params(GPTConfig.preset("gpt2-355m", vocab_size=50257)) == 354_823_168  # GPT-2 medium
    assert estimate_num_params(GPTConfig.preset("tinyllama-1.1b")) == 1_100_048_384  # TinyLlama-1.1B


SWITCHES = dict(norm=("layernorm", "rmsnorm"), mlp=("gelu", "swiglu", "relu2"), pos=("learned", "rope"),
                bias=(True, False), tie_embeddings=(True, False), n_kv_head=(None, 1, 2), mlp_hidden=(None, 50),
                window=(None, 4), qk_norm=(False, True))


@pytest.mark.parametrize("options", [dict(zip(SWITCHES, v)) for v in itertools.product(*SWITCHES.values())],
                         ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_formula_equals_real_count_for_every_switch_combination(options):
    config = GPTConfig(**SMALL_SHAPE, **options)
    assert estimate_num_params(config) == meta_num_params(config)


def test_num_params_counts_tied_weights_once_and_can_exclude_positions():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight
    every_use = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert model.num_params() == every_use - model.wte.weight.numel()
    assert model.num_params(exclude_positions=True) == model.num_params() - 32 * 128
    rope = GPT(tiny(pos="rope"))
    assert rope.num_params(exclude_positions=True) == rope.num_params()
    assert param_breakdown(tiny())["output head"] == 0 and param_breakdown(tiny(tie_embeddings=False))["output head"] == 128 * 128


# ------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_flops_per_token_matches_pytorchs_flop_counter(recipe):
    config = tiny(**RECIPES[recipe])
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    counted = counter.get_total_flops() / idx.numel()
    # the formula also counts biases and norm gains, which do no matmul work: slightly above, never below
    assert 0 <= flops_per_token(config, config.block_size) / counted - 1 < 0.01


def test_flops_formula_by_hand():
    config = GPTConfig.preset("small")
    n = 35_823_616 - 1024 * 512  # without the position table
    assert flops_per_token(config, 256) == 6 * n + 12 * 6 * 8 * 64 * 256
    untied = GPTConfig.preset("small", tie_embeddings=False)
    assert flops_per_token(untied, 256) - flops_per_token(config, 256) == 0, "the token lookup does no matmul"


# ------------------------------------------------------------------ forward, loss, init
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_loss_at_initialisation_is_about_ln_vocab(recipe):
    config = tiny(vocab_size=512, **RECIPES[recipe])
    sigma = 0.02 * math.sqrt(config.n_embd)  # logits ~ N(0, sigma^2) after the final norm
    for seed in range(3):
        torch.manual_seed(seed)
        idx = torch.randint(0, config.vocab_size, (8, config.block_size + 1))
        with torch.no_grad():
            loss = GPT(config)(idx[:, :-1], idx[:, 1:])[1].item()
        assert abs(loss - (math.log(config.vocab_size) + sigma**2 / 2)) < 0.05, (seed, loss)


def test_padding_targets_are_ignored():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 128, (3, 32))
    targets = torch.randint(0, 128, (3, 32))
    logits, _ = model(idx)
    padded = targets.clone()
    padded[:, 20:] = IGNORE_INDEX
    expected = F.cross_entropy(logits[:, :20].flatten(0, 1), targets[:, :20].flatten())
    torch.testing.assert_close(model(idx, padded)[1], expected)


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", n_layer=8)
    model = GPT(config)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith("blocks."):
            std = 0.02 / math.sqrt(2 * 8) if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() / std - 1) < 0.05, name
        if name.endswith("bias"):
            assert not p.any(), name


def test_swiglu_module_equals_the_formula():
    config = tiny(mlp="swiglu", bias=False)
    mlp = SwiGLUMLP(config)
    w_gate, w_up = mlp.c_fc.weight.chunk(2)
    x = torch.randn(2, 3, config.n_embd)
    torch.testing.assert_close(mlp(x), swiglu(x, w_gate, w_up, mlp.c_proj.weight))
    assert GPTConfig.preset("small", mlp="swiglu").mlp_hidden_size == 1536  # 8*512//3 = 1365 -> 1536


def test_relu2_module_is_the_square_of_pytorchs_relu():
    config = tiny(mlp="relu2")
    mlp = ReLUSquaredMLP(config)
    x = torch.randn(2, 3, config.n_embd)
    hidden = mlp.c_fc(x)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.pow(torch.nn.ReLU()(hidden), 2)))
    assert config.mlp_hidden_size == 4 * config.n_embd and "gelu" not in dict(mlp.named_children())
    assert isinstance(GPT(config).blocks[0].mlp, ReLUSquaredMLP)


def test_bf16_autocast_forward_and_backward():
    model = GPT(tiny())
    idx = torch.randint(0, 128, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.wte.weight.grad is not None


# ------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_same_loss_and_gradients(dropout):
    torch.manual_seed(0)
    model = GPT(tiny(dropout=dropout))
    idx = torch.randint(0, 128, (2, 32))
    results = []
    for checkpointed in (False, True):
        for block in model.blocks:
            block.checkpointed = checkpointed
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = model(idx, idx)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert all(b.checkpointed for b in GPT(tiny(gradient_checkpointing=True)).blocks)


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_kv_cache_token_by_token_equals_full_forward(recipe):
    torch.manual_seed(0)
    model = GPT(tiny(**RECIPES[recipe])).eval()
    idx = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_kv_cache(2)
        stepped = torch.cat([model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(32)], dim=1)
        assert cache.length == 32
        cache.reset()
        chunked = torch.cat([model(idx[:, :13], kv_cache=cache)[0], model(idx[:, 13:], kv_cache=cache, start_pos=13)[0]], 1)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)


def test_rope_with_window_reads_beyond_the_context_with_and_without_cache():
    torch.manual_seed(0)
    model = GPT(tiny(pos="rope", window=8, block_size=16)).eval()
    idx = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_kv_cache(1, max_len=40)
        stepped = torch.cat([model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(40)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)


def test_kv_cache_start_pos_must_follow_the_cache():
    model = GPT(tiny()).eval()
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(CourseError, match="start_pos"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache, start_pos=0)


# ------------------------------------------------------------------ torch.compile
def test_forward_compiles_as_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=256)).eval()
    idx = torch.randint(0, 256, (2, 32))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_logits, eager_loss = model(idx, idx)
        logits, loss = compiled(idx, idx)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_save_and_load_round_trip(tmp_path, recipe):
    torch.manual_seed(0)
    tokenizer = CharTokenizer().train("hello world, this is a test")
    model = GPT(tiny(vocab_size=tokenizer.vocab_size, **RECIPES[recipe])).eval()
    save_pretrained(torch.compile(model), tmp_path / "ckpt", tokenizer)  # the wrapper is looked through
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "ckpt")
    assert not loaded.training and loaded.config == model.config
    assert loaded_tokenizer.fingerprint == tokenizer.fingerprint
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    idx = torch.tensor([tokenizer.encode("hello world")])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_load_without_tokenizer(tmp_path):
    save_pretrained(GPT(tiny()), tmp_path)
    model, tokenizer = load_pretrained(tmp_path)
    assert tokenizer is None and model.config == tiny()


def test_load_errors_are_course_errors(tmp_path):
    with pytest.raises(CourseError, match="config.json is missing"):
        load_pretrained(tmp_path / "nowhere")
    save_pretrained(GPT(tiny()), tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CourseError, match="damaged"):
        load_pretrained(tmp_path / "a")
    save_pretrained(GPT(tiny()), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CourseError, match="does not match"):
        load_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(CourseError, match="not valid JSON"):
        load_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "layers": 3}))
    with pytest.raises(CourseError, match="layers"):
        load_pretrained(tmp_path / "b")
    with pytest.raises(CourseError, match="vocab_size"):
        save_pretrained(GPT(tiny(vocab_size=8)), tmp_path / "c", CharTokenizer().train("abc"))


# ------------------------------------------------------------------ config and bad input
def test_config_round_trips_through_a_dict():
    for name in PRESETS:
        config = GPTConfig.preset(name)
        assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("overrides, field", [
    (dict(n_embd=130), "n_embd"), (dict(n_kv_head=3), "n_kv_head"), (dict(n_kv_head=16), "n_kv_head"),
    (dict(norm="batchnorm"), "norm"), (dict(mlp="relu"), "mlp"), (dict(pos="alibi"), "pos"),
    (dict(vocab_size=0), "vocab_size"), (dict(n_layer=2.5), "n_layer"), (dict(dropout=1.0), "dropout"),
    (dict(window=0), "window"), (dict(pos="rope", n_embd=24, n_head=8), "n_embd / n_head"), (dict(flash=True), "flash"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(CourseError, match=field.replace("/", "\\/")):
        GPTConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(CourseError, match="tiny, small, gpt2-124m, gpt2-355m, tinyllama-1.1b"):
        GPTConfig.preset("huge")


@pytest.mark.parametrize("old, new", [("medium", "gpt2-124m"), ("large", "gpt2-355m"), ("xl", "tinyllama-1.1b")])
def test_old_preset_names_load_with_a_warning(old, new):
    with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'"):
        config = GPTConfig.preset(old, vocab_size=512)
    assert config == GPTConfig.preset(new, vocab_size=512)


@pytest.mark.parametrize("options", [{}, dict(pos="rope")])
def test_sequence_longer_than_the_context_is_refused(options):
    model = GPT(tiny(**options))
    with pytest.raises(CourseError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_kv_cache(1, max_len=64)
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(CourseError, match="Crop the input"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
