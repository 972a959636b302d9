"Chapter 08: the memory estimator against measurements on CPU, checkpointing, and out-of-memory recovery."
import pytest
import torch

from openllm_edu.core import CourseError
from openllm_edu.memory import (
    GiB,
    MemoryBudgetExceeded,
    MiB,
    compare_estimate,
    estimate_memory,
    fit_micro_batch,
    largest_batch_that_fits,
    largest_preset_that_fits,
    optimizer_state_bytes,
)
from openllm_edu.model import GPTConfig


@pytest.mark.parametrize("name, batch, seq", [("tiny", 4, 64), ("small", 2, 64)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_within_15_percent_of_measurement(name, batch, seq, precision):
    r = compare_estimate(GPTConfig.preset(name, vocab_size=512 if name == "tiny" else 32000), batch, seq, precision)
    for kind in ["activations", "peak"]:
        assert abs(r[f"{kind} estimated"] / r[f"{kind} measured"] - 1) < 0.15, (kind, r)


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
