"""Chapter 09: data parallelism with real processes on gloo, at 127.0.0.1 only.

Processes are started two ways: `run_processes` (torch.multiprocessing, fork) for the numerical checks, and
torchrun (`launch`) where the launcher itself is under test. Every call that starts processes has a timeout,
so a hang fails the test instead of blocking the suite.
"""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from openllm_edu.core import CourseError
from openllm_edu.distributed import (
    DistributedContext,
    RankFailedError,
    evaluate_lm_distributed,
    launch,
    no_gradient_sync,
    run_processes,
    threads_per_process,
    torchrun_command,
    wrap_model,
)
from openllm_edu.metrics import evaluate_lm
from openllm_edu.model import GPT, GPTConfig

CONFIG = GPTConfig.preset("tiny", vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32)
STEPS, HALF = 4, 4  # each rank's micro-batch is HALF sequences; one process takes 2 * HALF
PROCESS_TIMEOUT = 120  # seconds, for any group of processes


def fresh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def fixed_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(0, CONFIG.vocab_size, (2 * HALF, CONFIG.block_size), generator=generator)
                  for _ in range(2)) for _ in range(STEPS)]


def train(model, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    "AdamW on the fixed batches; rank r takes rows [r * share, (r + 1) * share) of each."
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    share = 2 * HALF // world_size
    for x, y in fixed_batches():
        _, loss = model(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    plain = getattr(model, "module", model)
    return {name: p.detach().clone() for name, p in plain.named_parameters()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    return train(fresh_model(), 0, 1)


def test_two_processes_with_batch_b_step_like_one_with_batch_2b(one_process):
    ranks = run_processes(lambda ctx: train(wrap_model(fresh_model(), ctx), ctx.rank, ctx.world_size), 2,
                          timeout=PROCESS_TIMEOUT)
    assert largest_difference(ranks[0], ranks[1]) == 0, "the replicas must stay identical"
    assert largest_difference(ranks[0], one_process) <= 1e-5
    assert largest_difference(one_process, {k: v for k, v in fresh_model().named_parameters()}) > 1e-3


def test_fsdp2_shards_and_steps_like_one_process(one_process):
    "FSDP2 (fully_shard) on CPU with gloo: this torch supports it, so it is checked, not skipped."
    def sharded(ctx):
        model = wrap_model(fresh_model(), ctx, strategy="fsdp")
        held = sum(p.to_local().numel() for p in model.parameters())
        train(model, ctx.rank, ctx.world_size)
        return held, {name: p.full_tensor() for name, p in model.named_parameters()}

    (held0, params0), (held1, params1) = run_processes(sharded, 2, timeout=PROCESS_TIMEOUT)
    assert held0 + held1 == fresh_model().num_params() and abs(held0 - held1) <= 64
    assert largest_difference(params0, params1) == 0
    assert largest_difference(params0, one_process) <= 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_without_sync_gives_the_whole_batch_gradient(strategy):
    "2 ranks x 2 micro-batches of 2, synced only on the last micro-step = 1 process with all 8 sequences."
    x, y = fixed_batches()[0]
    whole = fresh_model()
    _, loss = whole(x, y)
    loss.backward()
    expected = {name: p.grad for name, p in whole.named_parameters()}

    def accumulate(ctx):
        model = wrap_model(fresh_model(), ctx, strategy=strategy)
        for micro in range(2):
            rows = slice(4 * ctx.rank + 2 * micro, 4 * ctx.rank + 2 * micro + 2)
            with no_gradient_sync(model) if micro == 0 else contextlib.nullcontext():
                _, loss = model(x[rows], y[rows])
                (loss / 2).backward()
        if strategy == "fsdp":
            return {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        return {name: p.grad for name, p in model.module.named_parameters()}

    grads = run_processes(accumulate, 2, timeout=PROCESS_TIMEOUT)
    assert largest_difference(grads[0], expected) <= 1e-6


def test_distributed_evaluation_matches_one_process():
    model = fresh_model()
    tokens = torch.randint(0, CONFIG.vocab_size, (500,), generator=torch.Generator().manual_seed(2))
    for max_tokens in (None, 200):
        alone = evaluate_lm(model, tokens, 1_500, block_size=16, batch_size=3, max_tokens=max_tokens)
        for world_size in (2, 3):
            shared = run_processes(lambda ctx: evaluate_lm_distributed(model, tokens, 1_500, 16, 3, max_tokens),
                                   world_size, timeout=PROCESS_TIMEOUT)
            assert all(result == shared[0] for result in shared)
            assert shared[0].tokens == alone.tokens and shared[0].bytes == alone.bytes
            assert shared[0].loss == pytest.approx(alone.loss, rel=1e-6)  # float32 batches add up in another order
            assert shared[0].bits_per_byte == pytest.approx(alone.bits_per_byte, rel=1e-6)


# ---------------------------------------------------------------- failures end the job, never hang it

def test_a_rank_that_raises_stops_run_processes():
    def fail_on_rank_1(ctx):
        if ctx.rank == 1:
            raise ValueError("no data for rank 1")
        torch.distributed.barrier()  # rank 0 would wait here for ever

    began = time.monotonic()
    place = r"rank 1 raised ValueError: no data for rank 1 \(in fail_on_rank_1, test_distributed.py line"
    with pytest.raises(RankFailedError, match=place):
        run_processes(fail_on_rank_1, 2, timeout=PROCESS_TIMEOUT)
    assert time.monotonic() - began < 30


def test_a_rank_that_hangs_is_stopped_after_the_timeout():
    def only_rank_0_waits(ctx):
        if ctx.rank == 0:
            time.sleep(600)

    began = time.monotonic()
    with pytest.raises(CourseError, match="did not finish within 3 s"):
        run_processes(only_rank_0_waits, 2, timeout=3)
    assert time.monotonic() - began < 15


FAILING_JOB = ["-c", """
import time
import torch, torch.distributed as dist
from openllm_edu.distributed import init_distributed
context = init_distributed()
if context.rank == 1:
    raise RuntimeError("rank 1 gives up")
dist.barrier()  # rank 0 waits here for a rank that is gone
time.sleep(600)
"""]


def test_a_rank_that_raises_makes_torchrun_exit_nonzero_quickly():
    began = time.monotonic()
    job = launch(FAILING_JOB, nproc_per_node=2, capture_output=True, timeout=PROCESS_TIMEOUT)
    seconds = time.monotonic() - began
    assert job.returncode != 0
    assert "rank 1 gives up" in job.stderr
    assert seconds < 60, f"torchrun took {seconds:.0f} s to stop a failed job"


# ---------------------------------------------------------------- bad input: one line that says what to do

@pytest.mark.parametrize("arguments, message", [
    (dict(nproc_per_node=0), "--nproc-per-node must be a whole number >= 1"),
    (dict(nproc_per_node=True), "--nproc-per-node must be a whole number >= 1"),
    (dict(program=[]), "nothing to launch"),
])
def test_bad_launch_arguments(arguments, message):
    arguments = {"program": ["train.py"], **arguments}
    with pytest.raises(CourseError, match=message):
        torchrun_command(**arguments)


def test_launch_command():
    single = torchrun_command(["train.py", "--steps", "3"], nproc_per_node=2)
    assert single[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    assert single[-5:] == ["--no-python", single[0], "train.py", "--steps", "3"]


def test_context_from_environment():
    context = DistributedContext.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0"}, device="cpu")
    assert (context.rank, context.local_rank, context.world_size, context.backend) == (3, 1, 4, "gloo")
    assert context.is_distributed and not context.is_main
    assert not DistributedContext.from_env({}, device="cpu").is_distributed
    with pytest.raises(CourseError, match="RANK=4 must be in"):
        DistributedContext.from_env({"RANK": "4", "WORLD_SIZE": "4"}, device="cpu")
    with pytest.raises(CourseError, match="WORLD_SIZE='two' is not a whole number"):
        DistributedContext.from_env({"WORLD_SIZE": "two"}, device="cpu")
    assert threads_per_process(2, cores=16) == 8 and threads_per_process(3, cores=2) == 1


# ---------------------------------------------------------------- the Trainer and the command line on several processes

CLI = str(Path(sys.executable).parent / "openllm-edu")


def toy_data():
    from openllm_edu.trainer import TrainData
    tokens = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16)
    return TrainData(train=tokens, val=tokens[:1_000], val_bytes=1_000, vocab_size=64, tokenizer_fingerprint="toy")


def toy_config(out_dir, **changes):
    from openllm_edu.train_config import TrainConfig
    values = dict(out_dir=str(out_dir), model="tiny", model_overrides=dict(n_layer=2, n_head=2, n_embd=32),
                  block_size=16, batch_size=4, grad_accum=2, max_steps=8, warmup_steps=2, eval_every=2,
                  eval_tokens=256, log_every=1, precision="fp32", progress=False, tensorboard=False, seed=3)
    return TrainConfig.from_dict({**values, **changes})


class Stop(Exception):
    "Stands in for a crash right after a checkpoint."


def fit_until(ctx, out_dir, stop_at=None, resume=False):
    "A Trainer on this rank (DDP when the world is 2), trained to max_steps or interrupted after `stop_at` steps."
    from openllm_edu.checkpoint import Checkpointer
    from openllm_edu.distributed import DataParallel
    from openllm_edu.trainer import Trainer
    saves = []

    class CountingCheckpointer(Checkpointer):
        def save(self, state, step, best=False):
            saves.append(step)
            return super().save(state, step, best)

    config = toy_config(out_dir)
    trainer = Trainer.from_config(config, data=toy_data(), strategy=DataParallel(ctx),
                                  checkpointer=CountingCheckpointer(Path(out_dir) / "checkpoints", config.keep_last))
    if resume:
        trainer.load_state_dict(Checkpointer.load(out_dir))

    def stop(t):
        if t.step == stop_at:
            raise Stop()

    trainer.callbacks.append(stop)
    try:
        trainer.fit()
    except Stop:
        pass
    return dict(params={k: v.clone() for k, v in trainer.model.state_dict().items()}, saves=saves,
                sampler_seed=trainer.sampler.seed, best_val_loss=trainer.best_val_loss, step=trainer.step,
                wrapped=type(trainer.parallel_model).__name__)


def test_trainer_on_two_ranks_writes_from_rank_0_only(tmp_path):
    rank0, rank1 = run_processes(fit_until, 2, args=(tmp_path / "run",), timeout=PROCESS_TIMEOUT)
    assert rank0["wrapped"] == rank1["wrapped"] == "DistributedDataParallel"
    assert rank0["saves"] == [2, 4, 6, 8] and rank1["saves"] == []
    assert largest_difference(rank0["params"], rank1["params"]) == 0
    assert rank0["best_val_loss"] == rank1["best_val_loss"], "evaluation is all-reduced: every rank agrees"
    assert rank0["sampler_seed"] == 3 and rank1["sampler_seed"] != 3, "rank 0 keeps the seed, rank 1 gets its own"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 9)), "one line per step: only rank 0 logs"
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert saved["world_size"] == 2


def test_resume_with_the_same_world_size_is_exact(tmp_path):
    straight = run_processes(fit_until, 2, args=(tmp_path / "straight",), timeout=PROCESS_TIMEOUT)
    run_processes(fit_until, 2, args=(tmp_path / "halves", 4), timeout=PROCESS_TIMEOUT)
    resumed = run_processes(fit_until, 2, args=(tmp_path / "halves", None, True), timeout=PROCESS_TIMEOUT)
    assert resumed[0]["step"] == 8
    assert largest_difference(straight[0]["params"], resumed[0]["params"]) == 0


def test_resume_on_another_world_size_continues_but_not_exactly(tmp_path):
    "2 processes to step 4, then 1 process to step 8: it resumes, but it sees other batches than 2 would."
    from openllm_edu.checkpoint import Checkpointer
    from openllm_edu.trainer import Trainer
    straight = run_processes(fit_until, 2, args=(tmp_path / "straight",), timeout=PROCESS_TIMEOUT)
    run_processes(fit_until, 2, args=(tmp_path / "halves", 4), timeout=PROCESS_TIMEOUT)
    single = Trainer.from_config(toy_config(tmp_path / "halves"), data=toy_data())
    state = Checkpointer.load(tmp_path / "halves")
    single.load_state_dict(state)
    assert single.step == 4 and largest_difference(single.model.state_dict(), state["model"]) == 0
    single.fit()
    assert single.step == 8
    assert largest_difference(straight[0]["params"], single.model.state_dict()) > 1e-4


def run_cli(*args, timeout=PROCESS_TIMEOUT):
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(OPENLLM_EDU_PROFILE="ci", OMP_NUM_THREADS="1")
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=environment, timeout=timeout)


def test_launch_train_on_two_processes(tmp_path):
    out = tmp_path / "run"
    done = run_cli("launch", "--nproc-per-node", "2", "train", "--out", out, "--max-steps", "6", "--no-progress",
                   "--precision", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run:") == 1 and "6 steps" in done.stdout, "rank 0 reports, once"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_00000006.pt" in checkpoints and all(n.endswith(".pt") for n in checkpoints), checkpoints
    assert torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 6, "each step logged once: only rank 0 logs"
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_train_without_a_launcher_is_one_process(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--out", out, "--max-steps", "3", "--no-progress", "--precision", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run:") == 1 and "3 steps" in done.stdout
    assert torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)["world_size"] == 1


@pytest.mark.parametrize("args, words", [
    (["launch", "--nproc-per-node", "0", "train"], ["--nproc-per-node must be a whole number >= 1"]),
    (["launch", "--nproc-per-node", "2"], ["nothing to launch"]),
    (["launch", "--nproc-per-node", "2", "doctor"], ["launch runs `train`"]),
    (["launch", "--nnodes", "2", "train"], ["needs --rdzv-endpoint"]),
    (["launch", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:1", "--join-timeout", "1",
      "train"], ["nothing answers at 127.0.0.1:1"]),
])
def test_launch_bad_input_is_one_line(args, words):
    done = run_cli(*args, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in done.stderr


def test_bench_data_parallel_reports_each_world_size():
    "What the benchmark returns, not how fast: speed targets live in `openllm-edu bench distributed`."
    from openllm_edu.bench import bench_data_parallel, format_data_parallel_bench
    rows = bench_data_parallel((1, 2), block_size=16, batch_size=2, steps=1, warmup=0, cores=1)
    assert [r["processes"] for r in rows] == [1, 2] and [r["effective_batch"] for r in rows] == [2, 4]
    assert rows[0]["speedup"] == 1 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tokens/s" in format_data_parallel_bench(rows)
    with pytest.raises(CourseError, match="steps=0"):
        bench_data_parallel((1,), steps=0)
