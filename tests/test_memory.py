"Chapter 08: the memory estimator against measurements on CPU, checkpointing, and out-of-memory recovery."
import itertools
import random

import pytest
import torch

from openllm_edu.core import CourseError, autocast
from openllm_edu.memory import (
    GiB,
    MemoryBudgetExceeded,
    MiB,
    block_activation_bytes,
    block_activation_parts,
    compare_estimate,
    estimate_memory,
    fit_micro_batch,
    largest_batch_that_fits,
    largest_preset_that_fits,
    optimizer_state_bytes,
    saved_tensors,
)
from openllm_edu.model import GPT, PRESETS, GPTConfig


@pytest.mark.parametrize("name, batch, seq", [("tiny", 4, 64), ("small", 2, 64)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_within_5_percent_of_measurement(name, batch, seq, precision):
    r = compare_estimate(GPTConfig.preset(name, vocab_size=512 if name == "tiny" else 32000), batch, seq, precision)
    for kind in ["activations", "peak"]:
        assert abs(r[f"{kind} estimated"] / r[f"{kind} measured"] - 1) < 0.05, (kind, r)


def test_optimizer_states_and_bad_names():
    assert [optimizer_state_bytes(10, o) for o in ["sgd", "sgd-momentum", "adamw", "lion"]] == [0, 40, 80, 40]
    with pytest.raises(CourseError, match="adamw"):
        optimizer_state_bytes(10, "adam2")
    with pytest.raises(CourseError, match="bf16"):
        estimate_memory(GPTConfig.preset("tiny"), 1, 8, precision="fp8")


def test_what_fits():
    small = GPTConfig.preset("small")
    batch = largest_batch_that_fits(small, 8 * GiB)
    assert estimate_memory(small, batch, precision="bf16").peak <= 8 * GiB < estimate_memory(small, batch + 1, precision="bf16").peak
    assert largest_batch_that_fits(small, 8 * GiB, checkpointing=True) > batch
    assert largest_batch_that_fits(small, MiB) == 0 and largest_preset_that_fits(MiB) is None
    assert largest_preset_that_fits(80 * GiB, 8) == "tinyllama-1.1b"


def test_oom_recovery_keeps_the_effective_batch():
    calls = []

    def step(micro, accumulation):
        calls.append((micro, accumulation))
        if micro > 3:
            raise torch.cuda.OutOfMemoryError("pretend")
        return micro * accumulation

    assert fit_micro_batch(step, 12, 1, log=None) == (12, 3, 4)
    assert calls == [(12, 1), (6, 2), (3, 4)]
    assert fit_micro_batch(lambda m, a: "ok", 8, 2, budget_bytes=100, peak_fn=lambda m: 30 * m, log=None) == ("ok", 2, 8)


def test_oom_at_micro_batch_one_is_a_course_error():
    def step(micro, accumulation):
        raise MemoryBudgetExceeded("too big")
    with pytest.raises(CourseError, match="micro-batch of 1"):
        fit_micro_batch(step, 4, 1, log=None)


def test_checkpointing_cuts_saved_activations_by_60_percent():
    from openllm_edu.memory import forward_saved_bytes
    from openllm_edu.model import GPT
    idx = torch.randint(0, 512, (8, 64))
    saved = {}
    for checkpointed in [False, True]:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("tiny", vocab_size=512, gradient_checkpointing=checkpointed)).train()
        saved[checkpointed] = forward_saved_bytes(model, idx, idx)
    assert saved[True] <= 0.4 * saved[False], saved


# Every switch GPTConfig offers; the full grid has 3072 combinations, the test measures a seeded sample.
SWITCHES = dict(norm=["layernorm", "rmsnorm"], mlp=["gelu", "swiglu", "relu2"], pos=["learned", "rope"],
                n_kv_head=[None, 2, 3, 1], dropout=[0.0, 0.1], bias=[True, False], tie_embeddings=[True, False],
                window=[None, 16], qk_norm=[False, True], gradient_checkpointing=[False, True])
SAMPLE = [dict(zip(SWITCHES, values)) for values in random.Random(8).sample(list(itertools.product(*SWITCHES.values())), 16)]
# the named presets' recipes at a tiny, odd width: 6 heads of 10 channels, a 97-token vocabulary
RECIPES = [{k: v for k, v in PRESETS[name].items() if k not in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}
           for name in PRESETS]
RECIPES = [dict(recipe, n_kv_head=recipe.get("n_kv_head") and 3) for recipe in RECIPES]


@pytest.mark.parametrize("switches", SAMPLE + RECIPES, ids=str)
def test_estimate_within_5_percent_for_every_switch(switches):
    config = GPTConfig(vocab_size=97, block_size=128, n_layer=2, n_head=6, n_embd=60, **switches)
    for precision in ["fp32", "bf16"]:
        r = compare_estimate(config, 3, 100, precision)
        for kind in ["activations", "peak"]:
            assert abs(r[f"{kind} estimated"] / r[f"{kind} measured"] - 1) < 0.05, (precision, kind, r)


@pytest.mark.parametrize("batch, seq", [(1, 37), (5, 23)])
def test_estimate_within_5_percent_at_odd_shapes(batch, seq):
    # the 1.1B preset's recipe and its MLP ratio (5632 / 2048 = 2.75) at width 40, heads of 10 channels
    recipe = dict(PRESETS["tinyllama-1.1b"], vocab_size=101, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=40,
                  mlp_hidden=110)
    for extra in [{}, dict(dropout=0.1, window=8), dict(gradient_checkpointing=True)]:
        for precision in ["fp32", "bf16"]:
            r = compare_estimate(GPTConfig(**{**recipe, **extra}), batch, seq, precision)
            for kind in ["activations", "peak"]:
                assert abs(r[f"{kind} estimated"] / r[f"{kind} measured"] - 1) < 0.05, (extra, precision, kind, r)


@pytest.mark.parametrize("switches", SAMPLE[:8], ids=str)
def test_block_parts_equal_the_saved_tensors(switches):
    config = GPTConfig(vocab_size=97, block_size=128, n_layer=1, n_head=6, n_embd=60,
                       **{**switches, "gradient_checkpointing": False})
    block = GPT(config).train().blocks[0]
    x = torch.randn(3, 20, 60, requires_grad=True)
    for precision in ["fp32", "bf16"]:
        with autocast(x.device, precision):
            _, found = saved_tensors(lambda: block(x), exclude=block)
        assert sum(size for size, _, _ in found.values()) == sum(block_activation_parts(config, 3, 20, precision).values())


def test_gpt2_block_formula_is_the_exercise_formula():
    config = GPTConfig.preset("tiny")
    n = 2 * 16 * 128
    assert block_activation_bytes(config, 2, 16) == 16 * n * 4 + (4 + 4) * 2 * 16 * 4
    for precision in ["fp32", "bf16"]:
        assert sum(block_activation_parts(config, 2, 16, precision).values()) == block_activation_bytes(config, 2, 16, precision)
