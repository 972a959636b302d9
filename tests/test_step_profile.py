"""Chapter 96b: sorting a profiled step's operations into categories. The rules are checked on operation names
by hand, the per-step times and call counts on a step whose operations are known, and the table by hand."""
import subprocess
import sys

import pytest
import torch

from openllm_edu.core import CourseError
from openllm_edu.step_profile import OpTime, StepProfile, bench_profile, format_step_profile, op_category, profile_step

CLI_MAIN = "import sys; from openllm_edu.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("name, category", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_log_softmax", "loss (softmax over the vocabulary)"), ("aten::nll_loss_backward", "loss (softmax over the vocabulary)"),
    ("aten::_softmax", "activations"), ("aten::copy_", "casts and copies"), ("aten::_to_copy", "casts and copies"),
    ("aten::fill_", "zero fills"), ("aten::native_layer_norm", "norms"), ("aten::gelu_backward", "activations"),
    ("aten::_fused_adamw_", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("## Call CompiledFxGraph abc ##", "compiled (fused element-wise)"), ("aten::embedding_dense_backward", "embeddings"),
    ("aten::add_", "other"), ("aten::mul", "other")])
def test_op_category_by_hand(name, category):
    assert op_category(name) == category


def test_profile_step_counts_the_operations_of_a_known_step():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    out = torch.empty(64, 64)

    def step():
        for _ in range(3):
            torch.mm(a, b)
        out.fill_(0.0)
        out.fill_(1.0)

    profiled = profile_step(step, "made up", steps=4, warmup=1)
    calls = {op.name: op.calls for op in profiled.ops}
    assert calls["aten::mm"] == 3 and calls["aten::fill_"] == 2  # per step, over 4 recorded steps
    assert set(profiled.by_category()) <= {"matmul", "zero fills", "other"}
    assert profiled.step_seconds > 0 and abs(sum(profiled.by_category().values()) - profiled.profiled_seconds) < 1e-12
    assert [op.seconds for op in profiled.ops] == sorted((op.seconds for op in profiled.ops), reverse=True)
    with pytest.raises(CourseError):
        profile_step(step, "made up", steps=0)


def test_format_step_profile_by_hand():
    profiles = [StepProfile("bf16", 1.0, [OpTime("aten::mm", "matmul", 0.3, 6), OpTime("aten::fill_", "zero fills", 0.1, 2)]),
                StepProfile("fp32", 2.0, [OpTime("aten::mm", "matmul", 1.5, 6)])]
    lines = format_step_profile(profiles, top=2).splitlines()
    assert lines[0].split() == ["ms", "per", "step", "(share)", "bf16", "fp32"]
    assert lines[1].split() == ["matmul", "300.0", "(75.0%)", "1500.0", "(100.0%)"]
    assert lines[2].split() == ["zero", "fills", "100.0", "(25.0%)", "0.0", "(0.0%)"]
    assert lines[3].split()[-2:] == ["400.0", "1500.0"] and lines[4].split()[-2:] == ["1000.0", "2000.0"]
    assert lines[6] == "bf16: the 2 largest operations" and lines[7].split()[:2] == ["aten::mm", "300.0"]


def test_bench_profile_on_tiny_sorts_a_real_bf16_step():
    [profiled] = bench_profile("tiny", 16, 2, ("bf16",), steps=1, reuse_memory=False)
    shares = profiled.by_category()
    assert profiled.variant == "bf16" and shares["matmul"] > 0 and shares["loss (softmax over the vocabulary)"] > 0
    assert any(op.name == "aten::_fused_adamw_" for op in profiled.ops)  # the bare step's fused AdamW
    with pytest.raises(CourseError, match="fp16"):
        bench_profile("tiny", 16, 2, ("bf16", "fp16"))


def test_bench_profile_cli_on_tiny_and_bad_flags():
    done = subprocess.run([sys.executable, "-c", CLI_MAIN, "bench", "profile", "--preset", "tiny", "--block", "16",
                           "--batch", "2", "--variants", "fp32", "bf16", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[-2:] == ["fp32", "bf16"] and any(line.startswith("matmul") for line in lines)
    assert "bf16: the 6 largest operations" in lines
    for flags in (["--variants", "fp16"], ["--steps", "0"]):
        bad = subprocess.run([sys.executable, "-c", CLI_MAIN, "bench", "profile", "--preset", "tiny", *flags],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
