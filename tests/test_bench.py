"""openllm_edu.bench: the arithmetic of FLOPs, MFU and the table is checked against hand-computed values, and
every benchmark runs end to end on the tiny model. No speed is asserted here: speed targets are measured with
`openllm-edu bench model` and `openllm-edu bench train`, never in tests."""
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from openllm_edu.bench import (
    BENCH_VARIANTS,
    LORA_PEAK_TARGET,
    LORA_TRAIN_BYTES_TARGET,
    SCORING_TARGET,
    TRAINER_OVERHEAD_TARGET,
    FinetuneRow,
    Timing,
    bench_config,
    bench_eval,
    bench_finetune,
    bench_generation,
    bench_gpt,
    bench_model,
    bench_peak,
    bench_shapes,
    bench_train,
    bench_train_step,
    bench_trainer_step,
    bench_variants,
    build_eval_pair,
    build_trainer_step,
    count_step_bytes,
    cpu_description,
    fastest_matmuls,
    finetune_model,
    finetune_ratios,
    format_eval_bench,
    format_finetune_bench,
    format_model_bench,
    format_peak_bench,
    format_train_bench,
    kv_cache_speedup,
    linear_shapes,
    make_train_step,
    matmul_flops,
    measure_matmul_peak,
    model_flops_utilization,
    precision_dtype,
    precision_dtype_name,
    scoring_ratio,
    scoring_rows,
    synthetic_train_data,
    time_calls,
    time_interleaved,
    time_matmul,
    time_shapes,
    trainer_overhead,
    trainer_precision,
    variant_settings,
)
from openllm_edu.core import PRECISIONS, CourseError
from openllm_edu.model import GPT, GPTConfig, flops_per_token

CLI_MAIN = "import sys; from openllm_edu.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    "The command line in a fresh process, as a user runs it."
    return subprocess.run([sys.executable, "-c", CLI_MAIN, *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, words) -> None:
    "Exit status 2 and one line on stderr, naming every word, without a traceback."
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    assert all(word in message for word in words), message


def test_matmul_flops_counts_a_multiply_and_an_add_per_term():
    assert matmul_flops(1, 1, 1) == 2
    assert matmul_flops(2, 3, 4) == 48
    assert matmul_flops(1024, 512, 32000) == 2 * 1024 * 512 * 32000


def test_mfu_by_hand():
    # small at T=256: 221,233,152 FLOPs per token; 600 tokens/s on a 200 GFLOP/s peak
    assert flops_per_token(GPTConfig.preset("small"), 256) == 221_233_152
    assert model_flops_utilization(221_233_152, 600, 200.0) == pytest.approx(0.663699456, abs=1e-12)
    assert model_flops_utilization(1e9, 100, 100.0) == pytest.approx(1.0)


def test_timing_rates_use_the_best_repeat():
    t = Timing("step", "fp32", [4.0, 2.0, 3.0], flops=1e12, tokens=1000, peak_gflops=1000.0)
    assert (t.best, t.median, t.spread) == (2.0, 3.0, 1.0)
    assert t.gflops == 500.0 and t.tokens_per_s == 500.0 and t.mfu == 0.5
    assert t.mfu == pytest.approx(model_flops_utilization(1e12 / 1000, t.tokens_per_s, 1000.0))
    assert Timing("matmul", "fp32", [1.0], flops=1e9).mfu is None  # no peak given
    assert Timing("generate", "fp32", [1.0], tokens=10, peak_gflops=100.0).mfu is None  # no FLOPs counted


def test_time_calls_leaves_out_the_warmup():
    calls = []
    seconds = time_calls(lambda: calls.append(None), repeats=3, warmup=2)
    assert len(calls) == 5 and len(seconds) == 3 and all(s >= 0 for s in seconds)
    with pytest.raises(CourseError, match="repeats"):
        time_calls(lambda: None, repeats=0)


def test_format_model_bench_by_hand():
    rows = [
        Timing("matmul 1024x1024", "fp32", [0.01, 0.0125], flops=2e9),
        Timing("train small 8x256", "bf16", [1.0, 1.1, 1.5], flops=600e9, tokens=2048, peak_gflops=800.0,
               first_seconds=2.5),
        Timing("generate small 256 (no cache)", "fp32", [10.0, 12.0], tokens=256, first_seconds=1.0),
        Timing("generate small 256 (KV cache)", "fp32", [1.6, 2.0], tokens=256, first_seconds=0.2),
    ]
    lines = format_model_bench(rows).splitlines()
    assert "threads" in lines[0]
    assert lines[1].split() == ["what", "precision", "first", "s", "best", "s", "median", "s", "spread",
                                "tokens/s", "GFLOP/s", "MFU"]
    assert lines[2].split() == ["matmul", "1024x1024", "fp32", "0.010", "0.011", "25%", "200.0"]
    assert lines[3].split() == ["train", "small", "8x256", "bf16", "2.50", "1.000", "1.100", "50%", "2,048",
                                "600.0", "75.0%"]
    assert lines[4].split()[-2:] == ["20%", "26"]  # 256 tokens in 10 s
    assert lines[5].split()[-2:] == ["25%", "160"]
    assert kv_cache_speedup(rows) == pytest.approx(6.25)
    assert lines[-1] == "KV cache: generation 6.2x faster"
    assert kv_cache_speedup(rows[:3]) is None and "KV cache:" not in format_model_bench(rows[:2])


def test_variants_are_core_precisions_with_or_without_compiling():
    settings = {variant: variant_settings(variant) for variant in BENCH_VARIANTS}
    assert all(precision in PRECISIONS for precision, _ in settings.values())
    # every training precision a bare step can run (fp16 needs a CUDA loss scaler), uncompiled, and bf16 compiled
    assert sorted(p for p, compiles in settings.values() if not compiles) == sorted(set(PRECISIONS) - {"fp16"})
    assert [p for p, compiles in settings.values() if compiles] == ["bf16"]
    assert bench_variants() == BENCH_VARIANTS
    assert bench_variants(compile=False) == tuple(v for v, (_, compiles) in settings.items() if not compiles)


@pytest.mark.parametrize("variant", BENCH_VARIANTS)
def test_each_variant_runs_the_bare_step_in_its_dtype_and_compiles_only_when_it_says_so(variant, monkeypatch):
    "The step really runs its matmuls in the dtype whose peak its MFU is measured against."
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)  # no minutes
    model = bench_gpt("tiny", 16)
    before = model.lm_head.weight.detach().clone()
    head_dtypes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
    x, y = torch.randint(0, model.config.vocab_size, (2, 2, 16))
    make_train_step(model, x, y, variant)()
    assert head_dtypes == [precision_dtype(variant)]
    assert head_dtypes[0] == {"fp32": torch.float32, "bf16": torch.bfloat16}[variant_settings(variant)[0]]
    assert compiled == ([model] if variant.endswith("-compile") else [])
    assert not torch.equal(before, model.lm_head.weight), "the step updated the weights"


def test_precisions_and_their_dtypes():
    assert [precision_dtype(p) for p in BENCH_VARIANTS] == [torch.float32, torch.bfloat16, torch.bfloat16]
    with pytest.raises(CourseError, match="precision='fp16'"):
        bench_train_step("tiny", 16, 1, precision="fp16", steps=1)
    with pytest.raises(CourseError, match="precision='int8'"):
        bench_model("tiny", precisions=("int8",))


def test_bench_config_grows_the_context_only_when_needed():
    assert bench_config("small", 256) == GPTConfig.preset("small")
    assert bench_config("tiny", 300).block_size == 300
    with pytest.raises(CourseError, match="preset"):
        bench_config("enormous", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_peak_runs(dtype):
    timing = time_matmul(dtype, 64, repeats=2, warmup=1)
    assert timing.flops == 2 * 64**3 and len(timing.seconds) == 2 and timing.gflops > 0
    assert measure_matmul_peak(dtype, sizes=(32, 64), repeats=2, warmup=1) > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_on_tiny(precision):
    t = bench_train_step("tiny", block_size=32, batch_size=2, precision=precision, steps=2, warmup=1,
                         peak_gflops=50.0)
    assert t.tokens == 64 and len(t.seconds) == 2 and t.first_seconds > 0
    assert t.flops == flops_per_token(GPTConfig.preset("tiny"), 32) * 64
    assert t.mfu == pytest.approx(t.gflops / 50.0)


def test_generation_on_tiny_with_and_without_cache():
    rows = [bench_generation("tiny", new_tokens=6, use_cache=use_cache, prompt_tokens=4, repeats=1)
            for use_cache in (False, True)]
    assert [r.tokens for r in rows] == [6, 6] and all(r.tokens_per_s > 0 for r in rows)
    assert "no cache" in rows[0].what and "KV cache" in rows[1].what
    # the same number of tokens each way, so the speed-up is the ratio of the two best times
    assert kv_cache_speedup(rows) == pytest.approx(rows[0].best / rows[1].best)
    assert kv_cache_speedup(rows[::-1]) == kv_cache_speedup(rows)  # found by name, not by position


def test_bench_model_on_tiny():
    rows = bench_model("tiny", block_size=32, batch_size=2, precisions=("fp32", "bf16"), steps=1, warmup=1,
                       new_tokens=4, generation_repeats=1, matmul_sizes=(32, 64), reuse_memory=False)
    assert [r.precision for r in rows] == ["fp32", "bf16", "fp32", "bf16", "fp32", "fp32"]
    assert rows[2].peak_gflops == rows[0].gflops and rows[3].peak_gflops == rows[1].gflops
    table = format_model_bench(rows)
    assert len(table.splitlines()) == 2 + len(rows) + 1 and "MFU" in table
    assert len(bench_model("tiny", 32, 2, precisions=(), new_tokens=0, matmul_sizes=(32,),
                           reuse_memory=False)) == 2


def test_reuse_freed_memory_in_a_fresh_process():
    # it changes malloc for the rest of the process, so it runs in its own interpreter
    code = "from openllm_edu.bench import reuse_freed_memory; print(reuse_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out == str(on_glibc)


def test_time_interleaved_takes_turns():
    calls = []
    seconds_a, seconds_b = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")],
                                            repeats=3, warmup=2)
    assert "".join(calls) == "ab" * 5 and len(seconds_a) == len(seconds_b) == 3
    assert time_interleaved([], repeats=2) == []
    with pytest.raises(CourseError, match="repeats"):
        time_interleaved([lambda: None], repeats=0)


def test_fastest_matmuls_keeps_the_best_of_the_run():
    peaks = fastest_matmuls((32,))
    assert list(peaks) == ["fp32", "bf16"] and [p.precision for p in peaks.values()] == ["fp32", "bf16"]
    unbeatable = {name: Timing("matmul 1x1", name, [1e-12], flops=1e6) for name in peaks}  # 1e9 GFLOP/s
    kept = fastest_matmuls((32,), best_so_far=unbeatable)
    assert all(kept[name] is unbeatable[name] for name in peaks)
    assert [precision_dtype_name(p) for p in BENCH_VARIANTS] == ["fp32", "bf16", "bf16"]


def test_trainer_precision_maps_compile_to_the_config():
    assert [trainer_precision(p) for p in BENCH_VARIANTS] == [dict(precision="fp32", compile=False),
                                                             dict(precision="bf16", compile=False),
                                                             dict(precision="bf16", compile=True)]
    with pytest.raises(CourseError, match="precision='fp16'"):
        trainer_precision("fp16")


def test_synthetic_train_data_is_reproducible_and_in_range():
    data = synthetic_train_data(4096, tokens=1000, seed=1)
    assert (len(data.train), len(data.val), data.val_bytes, data.vocab_size) == (900, 100, 100, 4096)
    assert data.train.dtype == np.uint16 and int(data.train.max()) < 4096
    assert np.array_equal(data.train, synthetic_train_data(4096, tokens=1000, seed=1).train)
    assert not np.array_equal(data.train, synthetic_train_data(4096, tokens=1000, seed=2).train)


def test_trainer_step_is_the_trainers_own_and_writes_nothing(tmp_path, monkeypatch):
    from openllm_edu.trainer import Trainer
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder either (runs/default)
    seen = []
    train_step = Trainer.train_step

    def recording_train_step(trainer):
        seen.append((trainer, train_step(trainer)))
        return seen[-1][1]

    monkeypatch.setattr(Trainer, "train_step", recording_train_step)
    step = build_trainer_step("tiny", 32, 2, "bf16", tmp_path / "run")
    step()
    step()
    trainer, metrics = seen[-1]
    assert len(seen) == 2 and trainer.step == 2 and np.isfinite(metrics["train/loss"])
    assert trainer.model.config == bench_config("tiny", 32) and trainer.precision == "bf16"
    assert (trainer.config.batch_size, trainer.config.block_size, trainer.config.grad_clip) == (2, 32, 1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_step_bench_on_tiny(precision):
    t = bench_trainer_step("tiny", block_size=32, batch_size=2, precision=precision, steps=2, warmup=1,
                           peak_gflops=50.0)
    assert t.what == "Trainer.train_step tiny 2x32" and t.precision == precision
    assert t.tokens == 64 and len(t.seconds) == 2 and t.first_seconds > 0
    assert t.flops == flops_per_token(GPTConfig.preset("tiny"), 32) * 64  # as the bare step counts them
    assert t.mfu == pytest.approx(t.gflops / 50.0)


def test_bench_train_on_tiny():
    rows = bench_train("tiny", block_size=32, batch_size=2, precisions=("fp32", "bf16"), steps=2, warmup=1,
                       matmul_sizes=(32, 64), reuse_memory=False)
    assert [(r.what, r.precision) for r in rows] == [
        (rows[0].what, "fp32"), (rows[1].what, "bf16"),
        ("train tiny 2x32", "fp32"), ("Trainer.train_step tiny 2x32", "fp32"),
        ("train tiny 2x32", "bf16"), ("Trainer.train_step tiny 2x32", "bf16"), ("seed-style train tiny 2x32", "fp32")]
    assert rows[0].what.startswith("matmul") and rows[1].what.startswith("matmul")
    assert all(len(r.seconds) == 2 and r.tokens == 64 and r.flops == rows[2].flops for r in rows[2:])
    assert [r.peak_gflops for r in rows[2:]] == [rows[0].gflops] * 2 + [rows[1].gflops] * 2 + [rows[0].gflops]
    overhead = trainer_overhead(rows)  # its arithmetic is checked by hand in test_format_train_bench_by_hand
    assert sorted(overhead) == ["bf16", "fp32"]
    for precision, bare, trainer in (("fp32", rows[2], rows[3]), ("bf16", rows[4], rows[5])):
        assert (overhead[precision] > 0) == (trainer.best > bare.best)  # a slower Trainer step is a positive cost
    lines = format_train_bench(rows).splitlines()
    assert len(lines) == 2 + len(rows) + 2 and lines[-2].startswith("target:")
    fastest, ratio = min(rows[3::2][:2], key=lambda r: r.best), rows[-1].best / min(r.best for r in rows[3::2][:2])
    assert lines[-1].startswith("against the seed-style step") and f"the {fastest.precision} Trainer step is " \
        f"{ratio:.2f}x faster" in lines[-1]
    assert lines[1].split()[-4:] == ["MFU", "vs", "bare", "target"]
    for line, precision in ((lines[5], "fp32"), (lines[7], "bf16")):
        verdict = "met" if overhead[precision] <= TRAINER_OVERHEAD_TARGET else "not met"
        assert line.endswith(f"{overhead[precision]:+.1%} {verdict:>8}")
    assert lines[4].split()[-1] == f"{rows[2].mfu:.1%}"  # the bare step's row has no overhead
    with pytest.raises(CourseError, match="precision='int8'"):
        bench_train("tiny", precisions=("fp32", "int8"))


def test_format_train_bench_by_hand():
    rows = [
        Timing("matmul 1024x1024", "fp32", [0.01], flops=2e9),
        Timing("train small 8x256", "fp32", [2.0, 2.4], flops=400e9, tokens=2048, peak_gflops=250.0,
               first_seconds=2.5),
        Timing("Trainer.train_step small 8x256", "fp32", [2.5, 2.08], flops=400e9, tokens=2048,
               peak_gflops=250.0, first_seconds=2.6),
        Timing("train small 8x256", "bf16", [1.0], flops=400e9, tokens=2048, peak_gflops=800.0, first_seconds=1.0),
        Timing("Trainer.train_step small 8x256", "bf16", [1.08], flops=400e9, tokens=2048, peak_gflops=800.0,
               first_seconds=1.1),
        Timing("Trainer.train_step small 8x256", "bf16-compile", [0.9], flops=400e9, tokens=2048),  # no bare row
    ]
    assert trainer_overhead(rows) == pytest.approx({"fp32": 0.04, "bf16": 0.08})  # best 2.08 / 2.0, 1.08 / 1.0
    lines = format_train_bench(rows).splitlines()
    assert lines[3].split() == ["train", "small", "8x256", "fp32", "2.50", "2.000", "2.200", "20%", "1,024",
                                "200.0", "80.0%"]
    assert lines[4].split()[-5:] == ["985", "192.3", "76.9%", "+4.0%", "met"]  # 2048 tokens, 400 GFLOP in 2.08 s
    assert lines[6].split()[-4:] == ["46.3%", "+8.0%", "not", "met"]
    assert lines[7].split()[-1] == "444.4" and len(lines) == 2 + len(rows) + 1


# --- bench eval: scoring against the training forward ---------------------------------------------------------

def test_scoring_rows_score_every_token_after_the_first():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert scoring_rows(ids) == [([5, 6, 7], 2), ([1, 2, 3], 2)]


def test_the_two_timed_functions_compute_the_same_loss(monkeypatch):
    "What score_rows scores is what the forward's loss averages: the same tokens, so tokens/s compare."
    from openllm_edu import scoring

    seen = {}
    real_score_rows = scoring.score_rows

    def recording(model, rows, batch_size):
        seen["scores"] = real_score_rows(model, rows, batch_size)
        seen["rows"], seen["model"] = rows, model
        return seen["scores"]

    monkeypatch.setattr(scoring, "score_rows", recording)
    forward, score = build_eval_pair("tiny", 16, 3)
    forward(), score()
    model, ids = seen["model"], torch.tensor([row for row, _ in seen["rows"]])
    assert ids.shape == (3, 17) and not model.training
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    logprobs = torch.cat([row_logprobs for row_logprobs, _ in seen["scores"]])
    assert logprobs.shape == (48,)
    assert torch.allclose(-logprobs.mean(), loss, atol=1e-5)


def test_bench_eval_on_tiny_is_consistent():
    rows = bench_eval("tiny", block_size=16, batch_size=2, repeats=2, warmup=0)
    assert [row.what for row in rows] == ["forward tiny 2x16", "score_rows tiny 2x16"]
    assert all(row.tokens == 32 and len(row.seconds) == 2 and row.first_seconds is not None for row in rows)
    ratio = scoring_ratio(rows)
    assert ratio == pytest.approx((32 / min(rows[1].seconds)) / (32 / min(rows[0].seconds)), rel=1e-12)
    score_line = format_eval_bench(rows).splitlines()[3]
    assert score_line.startswith("score_rows tiny 2x16") and f"{ratio:.2f}x" in score_line
    assert score_line.endswith("not met") == (ratio < SCORING_TARGET)
    with pytest.raises(CourseError, match="repeats"):
        bench_eval("tiny", block_size=16, batch_size=2, repeats=0)


def test_format_eval_bench_by_hand():
    rows = [Timing("forward small 8x256", "fp32", [2.0, 2.5], tokens=2048, first_seconds=3.0),
            Timing("score_rows small 8x256", "fp32", [2.1, 2.2], tokens=2048, first_seconds=2.5)]
    assert scoring_ratio(rows) == pytest.approx(2.0 / 2.1)
    lines = format_eval_bench(rows).splitlines()
    assert lines[2].split()[-1] == "1,024"  # 2048 tokens in 2.0 s, and no ratio on the forward's line
    assert lines[3].split()[-3:] == ["975", "0.95x", "met"]  # 2048 / 2.1 s; 2.0 / 2.1 = 0.952 >= 0.9



def _storage_bytes(tensors) -> int:
    "Bytes of the storages behind `tensors`: another way to count than numel × element_size."
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("rank, targets", [(None, "attention"), (4, "attention"), (2, "all")])
def test_count_step_bytes_equals_an_independent_count(rank, targets):
    from openllm_edu.lora import lora_parameters
    from openllm_edu.optim import OptimizerConfig, make_optimizer
    x, y = torch.randint(0, 4096, (2, 2, 16))
    measured_model = finetune_model("tiny", 16, rank, targets)
    counted = count_step_bytes(measured_model, make_optimizer(measured_model, OptimizerConfig()), x, y)

    model = finetune_model("tiny", 16, rank, targets)  # the same model again, stepped here by hand
    optimizer = make_optimizer(model, OptimizerConfig())
    model(x, y)[1].backward()
    optimizer.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    states = [t for state in optimizer.state.values() for t in state.values()]
    assert counted == (_storage_bytes(grads), _storage_bytes(states))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank is not None:  # only the adapters train, and only they have optimizer states
        assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
        assert set(optimizer.state) == set(trainable)
    numbers = sum(p.numel() for p in trainable)
    assert counted == (4 * numbers, 2 * 4 * numbers + 4 * len(trainable))  # fp32 grad; exp_avg, exp_avg_sq, step


def test_finetune_ratios_by_hand():
    rows = [FinetuneRow("LoRA r=2", 5, 20, 48, 6_000_000, [0.9]),
            FinetuneRow("full", 500, 2000, 4020, 10_000_000, [1.0, 1.2], first_seconds=3.0),
            FinetuneRow("LoRA r=4", 10, 40, 88, 7_000_000, [0.8])]
    ratios = finetune_ratios(rows)
    assert ratios[1] == dict(trainable=1.0, train_bytes=1.0, peak=1.0, seconds=1.0)
    assert ratios[0] == pytest.approx(dict(trainable=0.01, train_bytes=68 / 6020, peak=0.6, seconds=0.9))
    assert ratios[2] == pytest.approx(dict(trainable=0.02, train_bytes=128 / 6020, peak=0.7, seconds=0.8))
    with pytest.raises(ValueError):
        finetune_ratios(rows[:1] + rows[2:])  # no full fine-tuning to compare with


def test_format_finetune_bench_says_which_target_is_met():
    full = FinetuneRow("full", 1000, 4000, 8040, 10 * 2 ** 20, [2.0])
    small_lora = FinetuneRow("LoRA r=4", 10, 40, 88, 5 * 2 ** 20, [1.0])
    big_lora = FinetuneRow("LoRA r=64", 100, 400, 1000, 7 * 2 ** 20, [1.5])  # 1400 / 12040 = 11.6% of the bytes
    lines = format_finetune_bench([full, small_lora]).splitlines()
    assert lines[2].split() == ["LoRA", "r=4", "10", "1.00%", "0.0", "1.06%", "5.0", "50.0%", "1.000", "0.50"]
    assert lines[-1] == (f"targets: LoRA grad+state <= {LORA_TRAIN_BYTES_TARGET:.0%} of full's: met; "
                         f"LoRA peak <= {LORA_PEAK_TARGET:.0%} of full's: met")
    last = format_finetune_bench([full, small_lora, big_lora]).splitlines()[-1]
    assert last.endswith("full's: not met; LoRA peak <= 60% of full's: not met")


def test_bench_finetune_on_tiny():
    rows = bench_finetune("tiny", block_size=32, batch_size=2, ranks=(2, 8), steps=2, warmup=0)
    full, *lora = rows
    assert [r.what for r in rows] == ["full", "LoRA r=2", "LoRA r=8"]
    assert all(len(r.seconds) == 2 and r.first_seconds is not None for r in rows)
    assert full.trainable == finetune_model("tiny", 32).num_params()
    assert lora[1].trainable == 4 * lora[0].trainable  # r·(in + out) per adapted layer
    param_bytes = 4 * full.trainable
    # at the end of backward the parameters, every gradient and the AdamW states are alive together
    assert full.peak_bytes >= param_bytes + full.train_bytes
    assert all(param_bytes + r.train_bytes <= r.peak_bytes < full.peak_bytes for r in lora)
    assert all(r.train_bytes / full.train_bytes <= LORA_TRAIN_BYTES_TARGET for r in lora)


@pytest.mark.parametrize("flags, words", [(["--ranks", "4", "0"], ["ranks", "at least 1"]),
                                          (["--preset", "huge"], ["huge", "tiny"]),
                                          (["--targets", "mlp"], ["mlp", "attention"]),
                                          (["--steps", "0"], ["steps"]),
                                          (["--block", "0"], ["--block"])])
def test_bench_finetune_cli_rejects_bad_flags_in_one_line(flags, words):
    assert_one_line_error(run_cli("bench", "finetune", "--preset", "tiny", *flags), words)


def test_bench_finetune_cli_on_tiny():
    done = subprocess.run([sys.executable, "-c", CLI_MAIN, "bench", "finetune", "--preset", "tiny", "--block", "16",
                           "--batch", "2", "--ranks", "2", "4", "--targets", "all", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "LoRA on all" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["full", "LoRA", "LoRA"]
    assert lines[3].split()[1] == "r=2" and lines[4].split()[1] == "r=4"
    assert lines[5].startswith("targets:") and lines[6].startswith("estimated (chapter 08):")


def test_bench_export_rows_and_ratios_on_a_tiny_model():
    pytest.importorskip("transformers", reason="bench export compares with transformers (the export extra)")
    pytest.importorskip("onnxruntime", reason="bench export runs ONNX Runtime (the export extra)")
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript (the export extra)")
    from openllm_edu.bench import bench_export, export_ratios, format_export_bench
    from openllm_edu.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, block_size=24, n_layer=1, n_head=2, n_embd=32))
    rows = bench_export(model, new_tokens=4, batch_size=2, tokens=10, repeats=2)
    assert [row.what for row in rows] == ["generate 1x4 ours", "generate 1x4 transformers", "generate 1x4 onnxruntime",
                                          "forward 2x10 eager", "forward 2x10 onnxruntime"]
    assert [row.tokens for row in rows] == [4, 4, 4, 20, 20]
    assert all(len(row.seconds) == 2 and row.best > 0 and row.first_seconds > 0 for row in rows)
    ratios = export_ratios(rows)
    assert ratios["ours_vs_transformers"] == pytest.approx(rows[1].best / rows[0].best)
    assert ratios["ours_vs_onnxruntime"] == pytest.approx(rows[2].best / rows[0].best)
    assert ratios["onnxruntime_forward_speedup"] == pytest.approx(rows[3].best / rows[4].best)
    lines = format_export_bench(rows).splitlines()
    assert len(lines) == 2 + 5 + 2 and lines[-2].startswith("generation: ours ") and "goal >= 1.0x" in lines[-2]
    assert lines[-1] == f"forward: ONNX Runtime {ratios['onnxruntime_forward_speedup']:.2f}x as fast as PyTorch eager"
    with pytest.raises(CourseError, match="new_tokens=17"):
        bench_export(model, new_tokens=17)  # 8 prompt tokens + 17 pass block_size 24


def test_bench_export_cli_on_a_saved_model(tmp_path):
    pytest.importorskip("transformers", reason="bench export compares with transformers (the export extra)")
    pytest.importorskip("onnxruntime", reason="bench export runs ONNX Runtime (the export extra)")
    from openllm_edu.model import GPT, save_pretrained

    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(vocab_size=128, block_size=24, n_layer=1, n_head=2, n_embd=32)), tmp_path / "m")
    done = subprocess.run([sys.executable, "-c", CLI_MAIN, "bench", "export", "--checkpoint", str(tmp_path / "m"),
                           "--new-tokens", "4", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'm'}; float32 on the CPU")
    assert [line.split()[2] for line in lines[3:8]] == ["ours", "transformers", "onnxruntime", "eager", "onnxruntime"]
    assert lines[5].split()[1] == "1x4" and lines[6].split()[1] == "1x24"  # forward default: batch 1 x block_size


# --- bench serve: a load generator against chapter 15b's server ----------------------------------------------------

def test_percentile_is_nearest_rank_by_hand_and_as_numpys_inverted_cdf():
    from openllm_edu.bench import percentile

    measured = [35.0, 20.0, 50.0, 15.0, 40.0]  # sorted: 15 20 35 40 50; rank ceil(q/100 * 5)
    assert [percentile(measured, q) for q in (5, 30, 40, 50, 99, 100)] == [15.0, 20.0, 20.0, 35.0, 50.0, 50.0]
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([], 50) is None
    values = np.random.default_rng(0).random(37).tolist()
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    with pytest.raises(CourseError, match="q=0"):
        percentile(measured, 0)


def _sse_lines(*events):
    import json
    return [line for e in events for line in (f"data: {e if isinstance(e, str) else json.dumps(e)}", "")]


def _text(text, finish=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_read_events_times_each_chunk_of_text_and_takes_the_usage():
    from openllm_edu.bench import RequestRecord, read_events

    clock = iter([2.0, 2.0, 2.5, 2.5, 3.25, 3.25, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0])  # each line, blank ones too
    record = RequestRecord(sent=1.5)
    read_events(_sse_lines(_text("a"), _text(""), _text("bc"), _text("", "length"),
                           {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}},
                           "[DONE]"), record, clock=lambda: next(clock))
    assert (record.text, record.tokens, record.finish_reason, record.error) == ("abc", 3, "length", None)
    assert record.arrivals == [2.0, 3.25] and record.ttft == 0.5 and record.gaps == [1.25]  # "" is no text


@pytest.mark.parametrize("events, error", [
    ((_text("a"),), "the stream ended before [DONE]"),
    ((_text("a"), "[DONE]"), "the stream ended without a finish_reason"),
    (({"error": {"message": "the request took too long"}}, "[DONE]"), "the request took too long"),
])
def test_read_events_reports_a_stream_that_did_not_finish(events, error):
    from openllm_edu.bench import RequestRecord, read_events

    record = RequestRecord(sent=0.0)
    read_events(_sse_lines(*events), record)
    assert record.error == error


def test_stream_completion_counts_a_refusal_and_a_dead_server_as_errors():
    import socket

    import httpx

    from openllm_edu.bench import completion_body, stream_completion

    busy = httpx.MockTransport(lambda request: httpx.Response(429, json={"error": {"message": "busy"}}))
    with httpx.Client(transport=busy) as client:
        record = stream_completion(client, "http://127.0.0.1:9", completion_body("Hi", 4))
    assert record.error.startswith("HTTP 429: ") and "busy" in record.error and record.tokens == 0
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with httpx.Client(timeout=5) as client:
        record = stream_completion(client, f"http://127.0.0.1:{port}", completion_body("Hi", 4))
    assert record.error.startswith("ConnectError")


def test_serve_speedup_and_table_by_hand():
    from openllm_edu.bench import RequestRecord, ServeRow, format_serve_bench, serve_speedup

    def done(tokens, ttft, gap):
        return RequestRecord(sent=0.0, arrivals=[ttft + i * gap for i in range(tokens)], tokens=tokens,
                             finish_reason="length")

    rows = [ServeRow("batched (max_batch=8)", 1, [done(4, 0.5, 0.25)], 1.0),
            ServeRow("batched (max_batch=8)", 8, [done(4, 0.125, 0.25)] * 8, 2.0),
            ServeRow("one at a time", 1, [done(4, 0.5, 0.25)], 1.0),
            ServeRow("one at a time", 8, [done(4, 0.5, 0.0625)] * 7 + [RequestRecord(0.0, error="boom")], 7.0)]
    assert (rows[1].tokens_per_s, rows[3].tokens_per_s, rows[3].errors, rows[3].requests) == (16.0, 4.0, 1, 8)
    assert rows[3].ttft(99) == 0.5 and rows[3].itl(50) == 0.0625 and rows[1].itl(99) == 0.25
    assert serve_speedup(rows) == (8, rows[1], rows[3], 4.0)
    assert serve_speedup(rows[::2], clients=8)[0] == 1  # 8 was not run: the largest level
    lines = format_serve_bench(rows).splitlines()
    assert lines[0].split()[:3] == ["variant", "clients", "requests"] and len(lines) == 1 + 4 + 2
    assert lines[4].split() == ["one", "at", "a", "time", "8", "8", "28", "4.0", "500.0", "500.0", "62.5", "62.5", "1"]
    assert lines[5] == ("at 8 clients: batched 16.0 tokens/s = 4.00x one at a time's 4.0 (goal >= 3x: met); "
                        "p99 TTFT batched 125.0 ms, one at a time 500.0 ms")
    assert lines[6] == "1 errors; the first: boom"


@pytest.mark.parametrize("settings, words", [
    (dict(clients=[]), ["clients=[]"]), (dict(clients=[1, 0]), ["clients=[1, 0]"]),
    (dict(requests=0), ["requests=0"]), (dict(max_tokens=0), ["max_tokens=0"]),
    (dict(max_batch=1), ["max_batch=1", "one-at-a-time"]),
])
def test_check_serve_settings_says_what_to_fix(settings, words):
    from openllm_edu.bench import check_serve_settings

    with pytest.raises(CourseError) as error:
        check_serve_settings(**(dict(clients=[1], requests=1, max_tokens=1, max_batch=2) | settings))
    assert all(word in str(error.value) for word in words)


def test_serve_max_tokens_leaves_room_for_the_longest_prompt():
    from openllm_edu.bench import serve_max_tokens

    class Chars:  # one token per character: the longest prompt, "Good morrow, cousin.", is 20 tokens
        def encode(self, text):
            return list(text)

    assert serve_max_tokens(Chars(), 64, 32) == 32 and serve_max_tokens(Chars(), 24, 32) == 4
    with pytest.raises(CourseError, match="longer block_size"):
        serve_max_tokens(Chars(), 20, 32)


@pytest.fixture(scope="module")
def ci_model():
    from openllm_edu.model import course_model
    return course_model("ci")


def test_bench_serve_on_the_ci_course_model(ci_model):
    from openllm_edu.bench import SERVE_PROMPTS, bench_serve, format_serve_bench, serve_speedup
    from openllm_edu.generate import GenerationConfig, generate

    model, tokenizer = ci_model
    rows = bench_serve(model, tokenizer, clients=(1, 2), requests=2, max_tokens=4, max_batch=4, timeout=30)
    assert [(row.variant, row.clients) for row in rows] == [("batched (max_batch=4)", 1), ("batched (max_batch=4)", 2),
                                                            ("one at a time", 1), ("one at a time", 2)]
    assert [row.requests for row in rows] == [2, 4, 2, 4] and all(row.errors == 0 for row in rows)
    # the course model does not write its end-of-text here: every request gets the 4 tokens it asked for
    assert all(r.tokens == 4 and r.finish_reason == "length" for row in rows for r in row.records)
    assert [row.tokens for row in rows] == [8, 16, 8, 16]
    greedy = GenerationConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    for index, prompt in enumerate(SERVE_PROMPTS[:4]):  # client c sends prompts c*2 and c*2+1: the first four
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = tokenizer.decode(generate(model, ids, greedy)[0, ids.shape[1]:].tolist())
        assert rows[1].records[index].text == rows[3].records[index].text == expected
    for row in rows:
        assert 0 < row.ttft(50) <= row.ttft(99) and 0 < row.itl(50) <= row.itl(99) and row.seconds > 0
    level, batched, one, speedup = serve_speedup(rows)
    assert (level, batched, one) == (2, rows[1], rows[3]) and speedup == rows[1].tokens_per_s / rows[3].tokens_per_s
    lines = format_serve_bench(rows).splitlines()
    assert len(lines) == 6 and lines[5].startswith(f"at 2 clients: batched {rows[1].tokens_per_s:.1f} tokens/s = "
                                                   f"{speedup:.2f}x one at a time's {rows[3].tokens_per_s:.1f}")


def test_bench_serve_cli_on_the_ci_course_model():
    done = subprocess.run([sys.executable, "-c", CLI_MAIN, "--profile", "ci", "bench", "serve", "--clients", "1", "2",
                           "--requests", "2", "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("the ci profile's course model; each client sends 2 streamed greedy requests of 4 ")
    assert [line.split()[-1] for line in lines[2:6]] == ["0"] * 4  # errors
    assert [line.split()[-8] for line in lines[2:6]] == ["2", "4", "2", "4"]  # requests
    assert [line.split()[-7] for line in lines[2:6]] == ["8", "16", "8", "16"]  # tokens
    assert lines[6].startswith("at 2 clients: batched ")


@pytest.mark.parametrize("flags, words", [
    (["--clients", "0"], ["clients=[0]"]), (["--requests", "0"], ["requests=0"]),
    (["--max-tokens", "-1"], ["max_tokens=-1"]), (["--max-batch", "1"], ["max_batch=1"]),
])
def test_bench_serve_cli_rejects_bad_flags_in_one_line(flags, words):
    assert_one_line_error(run_cli("--profile", "ci", "bench", "serve", *flags), words)


def test_linear_shapes_are_the_models_products_listed_by_hand():
    config = GPTConfig.preset("tiny", vocab_size=300)
    c, tokens = config.n_embd, 2 * 16
    expected = [(tokens, c, 3 * c), (tokens, c, c), (tokens, c, 4 * c), (tokens, 4 * c, c), (tokens, c, 300)]
    assert linear_shapes(GPT(config), tokens) == expected  # distinct, in module order; tied head counted once
    assert bench_shapes("tiny", 16, 2) == linear_shapes(bench_gpt("tiny", 16), 32)  # the meta device: same shapes


def test_time_shapes_gives_a_best_per_round_and_the_flops_of_each_shape():
    rows = time_shapes(torch.float32, [(8, 16, 32), (32, 32, 32)], rounds=3, repeats=2, warmup=1)
    assert [r.what for r in rows] == ["matmul 8x16x32", "matmul 32x32"]
    assert [r.flops for r in rows] == [2 * 8 * 16 * 32, 2 * 32**3] and all(len(r.seconds) == 3 for r in rows)
    assert all(r.precision == "fp32" and r.best > 0 for r in rows)
    with pytest.raises(CourseError):
        time_shapes(torch.float32, [(8, 8, 8)], rounds=0)
    rows = bench_peak("tiny", 16, 2, rounds=1, sizes=(8,))
    shapes = ["matmul 8x8"] + [f"matmul {m}x{k}x{n}" for m, k, n in bench_shapes("tiny", 16, 2)]
    assert [(r.what, r.precision) for r in rows] == [(w, p) for p in ("fp32", "bf16") for w in shapes]


def test_fastest_matmuls_takes_the_model_shapes_as_candidates():
    shapes = [(64, 16, 8), (64, 32, 16)]
    peaks = fastest_matmuls((8,), shapes=shapes, rounds=2)
    names = {"matmul 8x8", "matmul 64x16x8", "matmul 64x32x16"}
    assert all(p.what in names and len(p.seconds) == 2 for p in peaks.values())
    assert [p.precision for p in peaks.values()] == ["fp32", "bf16"]


def test_format_peak_bench_by_hand():
    rows = [Timing("matmul 1024x1024", "fp32", [0.01, 0.0105], flops=2e9),  # 200 GFLOP/s, rounds within 5%
            Timing("matmul 2048x512x32000", "fp32", [0.5], flops=2 * 2048 * 512 * 32000),  # 134.2
            Timing("matmul 1024x1024", "bf16", [0.004, 0.005], flops=2e9)]  # 500
    lines = format_peak_bench(rows).splitlines()
    assert "threads" in lines[0] and cpu_description() in lines[0]
    assert lines[-2:] == ["fp32 peak: 200.0 GFLOP/s (matmul 1024x1024); its 2 rounds within 5.0%",
                          "bf16 peak: 500.0 GFLOP/s (matmul 1024x1024); its 2 rounds within 25.0%"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_cpu_description_names_family_and_model_from_cpuinfo():
    info = {}
    for line in open("/proc/cpuinfo").read().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    described = cpu_description()
    if "cpu family" in info:
        assert f"family {info['cpu family']} model {info['model']}" in described
    if "model name" in info:
        assert described.startswith(info["model name"])


def test_bench_peak_cli_on_tiny_and_bad_flags():
    done = run_cli("bench", "peak", "--preset", "tiny", "--block", "16", "--batch", "2", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    shapes = 2 + len(bench_shapes("tiny", 16, 2))  # 1024² and 2048², then the model's
    assert len(lines) == 2 + 2 * shapes + 2 and lines[-2].startswith("fp32 peak:") and lines[-1].startswith("bf16 peak:")
    assert "its 2 rounds within" in lines[-1]
    assert_one_line_error(run_cli("bench", "peak", "--rounds", "0"), ["--rounds 0", "at least 1"])


def test_seed_step_is_the_v01_recipe_and_matches_the_bare_model_loss():
    "Hand-written attention, checkpointed blocks and the unfused AdamW change the speed, not the numbers."
    from openllm_edu import attention
    from openllm_edu.bench import build_seed_step, hand_written_attention, seed_speedup

    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    with hand_written_attention():
        written = attention.fused_causal_attention(q, k, v)
        windowed = attention.fused_causal_attention(q, k, v, window=4)  # the seed had no window: SDPA's path
    assert torch.allclose(written, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                          atol=1e-5)
    assert attention.fused_causal_attention.__name__ == "fused_causal_attention"
    assert torch.equal(windowed, attention.fused_causal_attention(q, k, v, window=4))
    from dataclasses import replace

    torch.manual_seed(0)
    reference = bench_gpt("tiny", 16)
    torch.manual_seed(0)
    checkpointed = GPT(replace(bench_config("tiny", 16), gradient_checkpointing=True)).train()
    x, y = torch.randint(0, reference.config.vocab_size, (2, 2, 16))
    with hand_written_attention():
        loss = checkpointed(x, y)[1]
        loss.backward()  # the recomputed blocks see the same attention
    assert torch.allclose(loss, reference(x, y)[1], atol=1e-5)  # the same weights from the same seed
    step = build_seed_step("tiny", 16, 2)
    step()  # one whole step runs
    rows = [Timing("Trainer.train_step tiny 2x16", "bf16", [0.5]), Timing("Trainer.train_step tiny 2x16", "fp32", [1.0]),
            Timing("seed-style train tiny 2x16", "fp32", [3.0])]
    fastest, ratio = seed_speedup(rows)
    assert fastest is rows[0] and ratio == 6.0 and seed_speedup(rows[:2]) is None
