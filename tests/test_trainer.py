"""The trainer of chapter 07: schedules, optimizers, accumulation, checkpoints and exact resume."""
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from openllm_edu.checkpoint import Checkpointer
from openllm_edu.core import CourseError, resolve_precision
from openllm_edu.data import shakespeare_documents
from openllm_edu.fast_bpe import prepare_data
from openllm_edu.generate import GenerationConfig, generate_text
from openllm_edu.loggers import JSONLinesLogger, read_metrics
from openllm_edu.memory import oom_back_off
from openllm_edu.model import GPT, GPTConfig
from openllm_edu.optim import Lion, Muon, OptimizerConfig, decay_groups, make_optimizer, muon_groups, orthogonalize
from openllm_edu.schedule import ScheduleConfig, constant, linear_decay, warmup_cosine, warmup_stable_decay
from openllm_edu.tokenizer import make_tokenizer
from openllm_edu.train_config import TrainConfig
from openllm_edu.trainer import (
    NonFiniteLossError,
    SampleTracker,
    SingleProcess,
    TrainData,
    Trainer,
    accumulate_gradients,
    clip_gradients,
)

SMALL_MODEL = dict(n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer-data")
    tokenizer = make_tokenizer("char").train(shakespeare_documents(max_bytes=60_000))
    prepare_data("shakespeare", tokenizer, folder / "data", val_fraction=0.2, max_bytes=60_000)
    return folder / "data"


def make_config(data_dir, out_dir, **overrides) -> TrainConfig:
    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", model_overrides=SMALL_MODEL,
                  block_size=32, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=2, eval_every=4,
                  eval_tokens=512, precision="fp32", progress=False, tensorboard=False, seed=3, log_every=1)
    return TrainConfig.from_dict({**values, **overrides})


# --- schedules -------------------------------------------------------------------------------------------

def test_warmup_cosine_known_points():
    assert warmup_cosine(0, 1.0, 0.0, 4, 104) == 0.25
    assert warmup_cosine(3, 1.0, 0.0, 4, 104) == 1.0
    assert math.isclose(warmup_cosine(54, 1.0, 0.0, 4, 104), 0.5)
    assert warmup_cosine(104, 1.0, 0.1, 4, 104) == 0.1 == warmup_cosine(10**6, 1.0, 0.1, 4, 104)


@pytest.mark.parametrize("schedule", [warmup_cosine, linear_decay, warmup_stable_decay])
def test_decaying_schedules_fall_from_max_to_min(schedule):
    lrs = [schedule(s, 2.0, 0.5, 10, 100) for s in range(120)]
    assert lrs[9] == 2.0 and lrs[100] == 0.5
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert all(0.5 <= lr <= 2.0 for lr in lrs[9:])


def test_constant_and_wsd():
    assert [constant(s, 1.0, 0.0, 2, 10) for s in (0, 1, 5, 50)] == [0.5, 1.0, 1.0, 1.0]
    assert warmup_stable_decay(79, 1.0, 0.0, 10, 100, 0.2) == 1.0
    assert warmup_stable_decay(90, 1.0, 0.0, 10, 100, 0.2) == 0.5


def test_schedule_config_validates():
    with pytest.raises(CourseError, match="unknown schedule"):
        ScheduleConfig("exponential")
    with pytest.raises(CourseError, match="warmup_steps"):
        ScheduleConfig("cosine", warmup_steps=10, total_steps=5)


# --- optimizers ------------------------------------------------------------------------------------------

def test_decay_groups_rule():
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, block_size=16, **SMALL_MODEL))
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(p.dim() >= 2 for p in decay["params"]) and "wte.weight" not in decayed and "wpe.weight" not in decayed
    assert {names[id(p)] for p in no_decay["params"]} >= {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_decay_groups_can_decay_embeddings_like_nanogpt():
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, block_size=16, **SMALL_MODEL))
    decay, no_decay = decay_groups(model, 0.1, decay_embeddings=True)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert {names[id(p)] for p in decay["params"]} == expected and {"wte.weight", "wpe.weight"} <= expected
    assert all(p.dim() < 2 for p in no_decay["params"])


def test_adamw_is_fused_on_cpu():
    model = nn.Linear(4, 4)
    optimizer = make_optimizer(model, OptimizerConfig("adamw"), lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_lion_one_step_by_hand():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    lion = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.1, 0.0, -4.0])
    lion.state[p]["exp_avg"] = torch.tensor([-1.0, 0.0, 0.2, 1.0])
    lion.step()
    # blend 0.9 m + 0.1 g = [-0.87, -0.01, 0.18, 0.5] -> sign [-1, -1, 1, 1]; p * (1 - 0.1 * 0.5) - 0.1 * sign
    assert torch.allclose(p.data, torch.tensor([1.05, -1.8, 0.375, 2.75]))
    assert torch.allclose(lion.state[p]["exp_avg"], torch.tensor([-0.987, -0.001, 0.198, 0.95]))


def test_lion_first_step_moves_every_weight_by_lr():
    p = nn.Parameter(torch.randn(10))
    before = p.detach().clone()
    p.grad = torch.randn(10)
    Lion([p], lr=0.01).step()
    assert torch.allclose((p.detach() - before).abs(), torch.full((10,), 0.01))


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_orthogonalize_is_close_to_the_polar_factor(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape) * torch.logspace(0, -2, shape[1])  # columns of very different sizes
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    polar, ortho = u @ vh, orthogonalize(matrix).float()
    sigma = torch.linalg.svdvals(ortho)
    assert ortho.shape == shape and 0.6 < sigma.min() and sigma.max() < 1.3
    assert (ortho * polar).sum() / (ortho.norm() * polar.norm()) > 0.95


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # the tall one takes sqrt(40/24)-larger steps
def test_muon_matches_torch_muon_on_matrices_and_adamw_on_the_rest(shape):
    torch.manual_seed(1)
    start = [torch.randn(shape), torch.randn(shape[0])]
    ours, theirs = ([nn.Parameter(t.clone()) for t in start] for _ in range(2))
    mine = Muon([dict(params=[ours[0]], muon=True, weight_decay=0.1, lr_scale=2.0), dict(params=[ours[1]])],
                lr=0.01, weight_decay=0.05)
    reference = [torch.optim.Muon([theirs[0]], lr=0.02, weight_decay=0.1, momentum=0.95),  # lr * lr_scale
                 torch.optim.AdamW([theirs[1]], lr=0.01, betas=(0.9, 0.95), weight_decay=0.05)]
    for _ in range(4):
        grads = [torch.randn_like(t) for t in start]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        mine.step()
        for optimizer in reference:
            optimizer.step()
    moved = (ours[0] - start[0]).abs().max()
    assert (ours[0] - theirs[0]).abs().max() < 4 * 0.05 * 0.02 < moved / 5  # bf16 rounding, 5 % of a step per step
    assert torch.allclose(ours[1], theirs[1], atol=1e-6)


def test_muon_refuses_vectors_and_bad_settings():
    with pytest.raises(CourseError, match="only 2-D"):
        Muon([dict(params=[nn.Parameter(torch.zeros(3))], muon=True)])
    with pytest.raises(CourseError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(3, 3))], momentum=1.0)
    with pytest.raises(CourseError, match="muon_lr_scale"):
        OptimizerConfig("muon", muon_lr_scale=0)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_groups_take_the_block_matrices_only(tied):
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, block_size=16, tie_embeddings=tied, **SMALL_MODEL))
    optimizer = make_optimizer(model, OptimizerConfig("muon", muon_lr_scale=7.0), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in optimizer.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr_scale"] == 7.0
    expected = {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert {names[id(p)] for p in muon[0]["params"]} == expected
    everything = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(everything) == sorted(names.values())  # every parameter once
    assert muon_groups(model, 0.1, 7.0)[0]["params"] == muon[0]["params"]


def test_muon_training_resumes_exactly(data_dir, tmp_path):
    config = make_config(data_dir, tmp_path / "straight", optimizer="muon", max_steps=8, eval_every=0,
                         checkpoint_every=4)
    straight = Trainer.from_config(config)
    straight.fit()
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0]
    shutil.copytree(tmp_path / "straight", tmp_path / "halves")
    for later in sorted((tmp_path / "halves" / "checkpoints").glob("*.pt"))[1:]:  # as if stopped after step 4
        later.unlink()
    resumed = Trainer.resume(tmp_path / "halves")
    assert resumed.step == 4 and resumed.optimizer.state  # Muon's momentum buffers came back
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


# --- precision, accumulation, clipping ------------------------------------------------------------------

def test_precision_rules():
    assert resolve_precision("fp32", "cpu") == "fp32"
    if os.path.exists("/proc/cpuinfo"):  # the CPU's own flags say whether bf16 runs in hardware
        flags = open("/proc/cpuinfo").read()
        assert resolve_precision("auto", "cpu") == ("bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32")
    with pytest.raises(CourseError, match="CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(CourseError, match="precision"):
        resolve_precision("int8", "cpu")
    with pytest.raises(CourseError, match="precision"):
        TrainConfig(precision="fp8")


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, block_size=16, **SMALL_MODEL))
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    loss_big = accumulate_gradients(model, [(x, y)])
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_micro = accumulate_gradients(model, list(zip(x.split(2), y.split(2))))
    for a, b in zip(big, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_big, loss_micro)


def test_clipping_unscales_first():
    model = nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()  # true gradient [1, 1, 1], norm sqrt(3)
    norm = clip_gradients(model, optimizer, max_norm=1.0, scaler=scaler)
    assert math.isclose(float(norm), math.sqrt(3), rel_tol=1e-5)
    assert math.isclose(model.weight.grad.norm().item(), 1.0, rel_tol=1e-5)


# --- config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run.json", "run.yaml"])
def test_config_round_trip(tmp_path, name):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    config = TrainConfig.from_dict(dict(max_steps=7, lr=2e-3, model_overrides={"n_layer": 2}, betas=(0.8, 0.9)))
    assert TrainConfig.load(config.save(tmp_path / name)) == config


def test_config_errors(tmp_path):
    with pytest.raises(CourseError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(CourseError, match="not found"):
        TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CourseError, match="could not be parsed"):
        TrainConfig.load(tmp_path / "bad.json")


# --- training, evaluation, checkpoints -------------------------------------------------------------------

def test_fit_logs_evaluates_and_keeps_last_and_best(data_dir, tmp_path):
    summary = Trainer.from_config(make_config(data_dir, tmp_path / "run", keep_last=2)).fit()
    assert summary["step"] == 12 and not summary["stopped_early"]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert all(r["val/bits_per_byte"] > 0 and math.isclose(r["val/perplexity"], math.exp(r["val/loss"])) for r in val)
    assert len([r for r in rows if "train/loss" in r]) == 12
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "step_00000008.pt", "step_00000012.pt"]
    best = Checkpointer.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["best_val_loss"] == min(r["val/loss"] for r in val)


def test_early_stopping_on_validation_loss(data_dir, tmp_path):
    # lr 0 never improves the model: the first evaluation is the best, then `patience` more end the run
    summary = Trainer.from_config(make_config(data_dir, tmp_path / "run", lr=0.0, min_lr=0.0, eval_every=2, patience=2,
                                  max_steps=50)).fit()
    assert summary["stopped_early"] and summary["step"] == 6
    assert Checkpointer.load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == 2


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
    trainer = Trainer.from_config(make_config(data_dir, tmp_path / "run"))
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        trainer.fit()
    assert trainer.checkpointer.latest() is None


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from openllm_edu.train_config import TrainConfig
    from openllm_edu.trainer import Trainer
    config_path, kill_at, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    def kill(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer.from_config(TrainConfig.load(config_path), callbacks=[kill]).fit()
""")


def test_resume_after_sigkill_is_exact(data_dir, tmp_path):
    config = make_config(data_dir, tmp_path / "killed", model_overrides={**SMALL_MODEL, "dropout": 0.1})
    straight = Trainer.from_config(config.replace(out_dir=str(tmp_path / "straight")))
    straight.fit()

    config.save(tmp_path / "config.json")
    (tmp_path / "child.py").write_text(CHILD)
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "config.json"), "8",
                           str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert Checkpointer.find(tmp_path / "killed").name == "step_00000008.pt"

    resumed = Trainer.resume(tmp_path / "killed")
    assert resumed.step == 8
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CourseError, match="not found"):
        Checkpointer.load(tmp_path / "nothing.pt")
    with pytest.raises(CourseError, match="no checkpoint"):
        Checkpointer.load(tmp_path)
    (tmp_path / "step_00000001.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(CourseError, match="damaged"):
        Checkpointer.load(tmp_path)


def test_resume_refuses_other_model_or_tokenizer_and_overwrites_nothing(data_dir, tmp_path):
    Trainer.from_config(make_config(data_dir, tmp_path / "run", max_steps=4)).fit()
    checkpoint = Checkpointer.find(tmp_path / "run")
    before = checkpoint.read_bytes()
    state = Checkpointer.load(checkpoint)

    bigger = Trainer.from_config(make_config(data_dir, tmp_path / "run", model_overrides={**SMALL_MODEL, "n_embd": 64}))
    with pytest.raises(CourseError, match="n_embd"):
        bigger.load_state_dict(state)
    with pytest.raises(CourseError, match="already holds checkpoints"):
        bigger.fit()

    other = Trainer.from_config(make_config(data_dir, tmp_path / "run"))
    other.data.tokenizer_fingerprint = "another tokenizer"
    with pytest.raises(CourseError, match="different tokenizer"):
        other.load_state_dict(state)
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.pt", "step_00000004.pt"]


def test_missing_data_is_a_course_error(tmp_path):
    with pytest.raises(CourseError, match="prepare"):
        Trainer.from_config(TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run")))


def test_empty_validation_split_is_refused_unless_evaluation_is_off(data_dir, tmp_path):
    trainer = Trainer.from_config(make_config(data_dir, tmp_path / "run", eval_every=0))
    trainer.data.val = trainer.data.val[:1]
    with pytest.raises(CourseError, match="validation split"):
        Trainer.from_config(make_config(data_dir, tmp_path / "run"), data=trainer.data)


def test_wandb_only_when_installed(data_dir, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(CourseError, match="pip install wandb"):
        Trainer.from_config(make_config(data_dir, tmp_path / "run", wandb=True)).fit()
    assert Trainer.from_config(make_config(data_dir, tmp_path / "run")).checkpointer.latest() is None


def test_save_pretrained_round_trip(data_dir, tmp_path):
    from openllm_edu.model import load_pretrained
    trainer = Trainer.from_config(make_config(data_dir, tmp_path / "run", max_steps=2, eval_every=0))
    trainer.fit()
    model, _ = load_pretrained(trainer.save_pretrained(tmp_path / "model"))
    for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


# --- out-of-memory back-off ------------------------------------------------------------------------------

class OutOfMemoryAbove(nn.Module):
    "Wraps a model; a forward pass on more than `limit` sequences raises CUDA's out-of-memory error."

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []

    def forward(self, idx, targets=None):
        self.batches.append(len(idx))
        if len(idx) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated): batch {len(idx)}")
        return self.model(idx, targets)


def test_simulated_oom_halves_the_micro_batch_and_learns_the_same(data_dir, tmp_path):
    reference = Trainer.from_config(make_config(data_dir, tmp_path / "reference", batch_size=8, grad_accum=1, eval_every=0))
    reference.fit()
    trainer = Trainer.from_config(make_config(data_dir, tmp_path / "oom", batch_size=8, grad_accum=1, eval_every=0),
                                  step_wrappers=[oom_back_off()])
    trainer.forward_model = OutOfMemoryAbove(trainer.model, limit=2)
    trainer.fit()
    assert trainer.micro_batch == 2
    assert trainer.forward_model.batches[:6] == [8, 4, 2, 2, 2, 2]  # two back-offs, then 4 micro-steps of 2
    assert set(trainer.forward_model.batches[6:]) == {2}  # later steps start at the smaller size
    for a, b in zip(reference.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    rows = [r for r in read_metrics(tmp_path / "oom" / "metrics.jsonl") if "micro_batch" in r]
    assert {r["micro_batch"] for r in rows} == {2}


def test_oom_back_off_survives_a_resume(data_dir, tmp_path):
    trainer = Trainer.from_config(make_config(data_dir, tmp_path / "run", batch_size=4, max_steps=4, eval_every=0),
                                  step_wrappers=[oom_back_off()])
    trainer.forward_model = OutOfMemoryAbove(trainer.model, limit=1)
    trainer.fit()
    assert trainer.micro_batch == 1
    resumed = Trainer.resume(tmp_path / "run", max_steps=6)
    assert resumed.micro_batch == 1 and resumed.step == 4


def test_cpu_memory_budget_picks_the_largest_micro_batch_that_fits(data_dir, tmp_path):
    from openllm_edu.memory import MiB, estimate_memory
    config = make_config(data_dir, tmp_path / "budget", batch_size=8, eval_every=0, max_steps=2)
    model_config = Trainer.from_config(config).model.config
    peaks = {b: estimate_memory(model_config, b, config.block_size).peak for b in (2, 4, 8)}
    assert peaks[2] < peaks[4] < peaks[8]
    budget_mb = (peaks[4] + peaks[8]) / 2 / MiB
    trainer = Trainer.from_config(config.replace(memory_budget_mb=budget_mb), step_wrappers=[oom_back_off(budget_mb)])
    trainer.fit()
    assert trainer.micro_batch == 4
    with pytest.raises(CourseError, match="micro-batch of 1"):
        Trainer.from_config(config.replace(out_dir=str(tmp_path / "tiny-budget"), memory_budget_mb=0.001),
                            step_wrappers=[oom_back_off(0.001)]).fit()
    with pytest.raises(CourseError, match="memory_budget_mb"):
        config.replace(memory_budget_mb=-1)


def test_a_batch_larger_than_the_data_is_refused(data_dir, tmp_path):
    with pytest.raises(CourseError, match="training split"):
        Trainer.from_config(make_config(data_dir, tmp_path / "big", batch_size=4096, block_size=32))
    assert not (tmp_path / "big").exists()


def test_resume_continues_in_the_folder_the_run_was_moved_to(data_dir, tmp_path):
    import shutil

    Trainer.from_config(make_config(data_dir, tmp_path / "first", max_steps=4, eval_every=0)).fit()
    shutil.move(tmp_path / "first", tmp_path / "moved")
    resumed = Trainer.resume(tmp_path / "moved", max_steps=6)
    assert resumed.config.out_dir == str(tmp_path / "moved") and resumed.step == 4
    resumed.fit()
    assert (tmp_path / "moved" / "checkpoints" / "step_00000006.pt").is_file()
    assert not (tmp_path / "first").exists()
    loose = tmp_path / "step_00000006.pt"  # a checkpoint file outside any run folder keeps its saved out_dir
    shutil.copy(tmp_path / "moved" / "checkpoints" / "step_00000006.pt", loose)
    assert Trainer.resume(loose).config.out_dir == str(tmp_path / "moved")


def test_torn_metric_lines_are_skipped_with_a_warning(tmp_path):
    "What a crash or a full disk leaves in metrics.jsonl must not stop a resume: the checkpoint is the truth."
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5}, {"step": 3, "train/loss": 3.0}]
    torn = b'{"step": 4, "train/lo\n\xff\xfe\x00 garbage\n[1, 2]\n{"no_step": 1}\n'
    path.write_bytes("".join(json.dumps(r) + "\n" for r in good).encode() + torn)
    with pytest.warns(UserWarning, match="skipped 4 damaged line"):
        assert read_metrics(path) == good
    with pytest.warns(UserWarning, match="skipped 4 damaged line"):
        logger = JSONLinesLogger(path)
        logger.start(resume_step=2)
        logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:2]


def test_a_second_process_on_the_same_run_folder_is_refused(data_dir, tmp_path):
    "Two runs writing one folder would interleave metrics and checkpoints: the second is refused, in one line."
    import subprocess
    import sys
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom openllm_edu.checkpoint import lock_run_folder\n"
        f"lock = lock_run_folder(Path({str(out)!r}))\nprint('locked', flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CourseError, match=rf"in use by another training process \(pid {holder.pid}\)"):
            Trainer.from_config(make_config(data_dir, out)).fit()
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert Trainer.from_config(make_config(data_dir, out)).fit()["step"] == 12  # a dead holder's lock is gone with it


@pytest.mark.parametrize("values, message", [
    ({"eval_every": "10"}, "eval_every='10' must be a whole number"), ({"grad_clip": "x"}, "grad_clip='x' must be a number"),
    ({"lr": "fast"}, "lr='fast' must be a number"), ({"seed": "abc"}, "seed='abc' must be a whole number"),
    ({"betas": 0.9}, "betas=0.9 must be two numbers"), ({"model_overrides": [1, 2]}, "must be a mapping"),
    ({"data_dir": 5}, "data_dir=5 must be a string"), ({"device": "tpu"}, "device='tpu' is not auto"),
    ({"eval_tokens": -5}, "eval_tokens=-5 must be positive"), ({"eval_every": -1}, "must not be negative"),
    ({"checkpoint_every": -2}, "must not be negative"), ({"compile": 1}, "compile=1 must be true or false"),
    ({"lr": -1e-3}, "lr=-0.001 must not be negative"), ({"eval_tokens": True}, "must be a whole number"),
    ({"peak_flops": 0}, "peak_flops=0 must be positive"),
])
def test_config_values_are_checked_up_front(values, message):
    "A config file can say anything: a wrong type or range is one sentence at load time, not a crash mid-run."
    with pytest.raises(CourseError, match=re.escape(message)):
        TrainConfig.from_dict(values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_cuda_without_one_is_one_sentence(data_dir, tmp_path):
    with pytest.raises(CourseError, match="sees no CUDA GPU"):
        Trainer.from_config(make_config(data_dir, tmp_path / "run", device="cuda"))


# --- composition: parts and seams are passed in ----------------------------------------------------------

def test_trainer_imports_no_later_chapter():
    code = ("import sys, openllm_edu.trainer; "
            "assert not {'openllm_edu.distributed', 'openllm_edu.memory'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class RecordingStrategy(SingleProcess):
    "One process, noting which of the strategy's moments the trainer reached."

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.calls = []

    def no_sync(self, model):
        self.calls.append("no_sync")
        return super().no_sync(model)

    def reduce_mean(self, tensor):
        self.calls.append("reduce_mean")
        return tensor

    def evaluate(self, model, tokens, n_bytes, **options):
        self.calls.append("evaluate")
        return super().evaluate(model, tokens, n_bytes, **options)

    def barrier(self):
        self.calls.append("barrier")


def test_a_strategy_and_a_step_wrapper_passed_in_are_used(data_dir, tmp_path):
    strategy, wrapped = RecordingStrategy(), []

    def wrapper(step_fn):
        def counted(trainer, x, y):
            wrapped.append(tuple(x.shape))
            return step_fn(trainer, x, y)
        return counted

    config = make_config(data_dir, tmp_path / "run", grad_accum=3, max_steps=4, eval_every=2)
    trainer = Trainer.from_config(config, strategy=strategy, step_wrappers=[wrapper], loggers=[])
    trainer.fit()
    assert wrapped == [(12, 32)] * 4  # grad_accum × batch_size sequences per step
    assert strategy.calls.count("no_sync") == 4 * 2  # every micro-step but the last
    assert strategy.calls.count("reduce_mean") == 4 and strategy.calls.count("evaluate") == 2
    assert strategy.calls.count("barrier") == 2 * 2  # around each of the 2 checkpoints
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "no loggers passed, none made"


def test_a_trainer_built_from_parts_equals_one_built_from_the_config(data_dir, tmp_path):
    from openllm_edu.data import BatchSampler
    from openllm_edu.trainer import TrainData
    config = make_config(data_dir, tmp_path / "config", max_steps=3, eval_every=0)
    from_config = Trainer.from_config(config)
    from_config.fit()
    data = TrainData.load(data_dir)
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig.preset("tiny", vocab_size=data.vocab_size, block_size=32, **SMALL_MODEL))
    by_hand = Trainer(model, make_optimizer(model, config.optimizer, lr=config.schedule.lr_at(0)), config.schedule,
                      BatchSampler(data.train, config.batch_size, config.block_size, seed=config.seed),
                      config=config.replace(out_dir=str(tmp_path / "parts")), data=data)
    by_hand.fit()
    for a, b in zip(from_config.model.parameters(), by_hand.model.parameters()):
        assert torch.equal(a, b)
    assert by_hand.checkpointer is None and not (tmp_path / "parts" / "checkpoints").exists()


def test_old_flat_configs_and_checkpoints_still_load(data_dir, tmp_path):
    flat = dict(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), model="tiny", model_overrides=SMALL_MODEL,
                block_size=32, batch_size=4, max_steps=6, optimizer="lion", lr=3e-3, min_lr=1e-4, weight_decay=0.2,
                betas=[0.8, 0.9], schedule="wsd", warmup_steps=2, decay_fraction=0.5, eval_every=0,
                precision="fp32", progress=False, tensorboard=False)
    (tmp_path / "old.json").write_text(json.dumps(flat))
    config = TrainConfig.load(tmp_path / "old.json")
    assert config.optimizer == OptimizerConfig("lion", weight_decay=0.2, betas=(0.8, 0.9))
    assert config.schedule == ScheduleConfig("wsd", max_lr=3e-3, min_lr=1e-4, warmup_steps=2, total_steps=6,
                                             decay_fraction=0.5)
    Trainer.from_config(config.replace(max_steps=3)).fit()
    checkpoint = Checkpointer.find(tmp_path / "run")
    state = Checkpointer.load(checkpoint)
    state["config"] = {**flat, "max_steps": 3}  # as a checkpoint written before the nesting holds it
    torch.save(state, checkpoint)
    resumed = Trainer.resume(tmp_path / "run", max_steps=6)
    assert resumed.step == 3 and resumed.config == config
    resumed.fit()
    assert resumed.step == 6


def test_a_memory_budget_without_the_back_off_is_refused(data_dir, tmp_path):
    with pytest.raises(CourseError, match="oom_back_off"):
        Trainer.from_config(make_config(data_dir, tmp_path / "run", memory_budget_mb=100.0))


# --- faults: a kill at any rename, stale temporary files, strangers' pickles -----------------------------------

KILL_AT_RENAME = textwrap.dedent("""
    import os, signal, sys, torch
    from openllm_edu.train_config import TrainConfig
    from openllm_edu.trainer import Trainer
    config_path, kill_at, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    rename, renames = os.replace, []
    def replace_or_die(source, target):
        if os.path.basename(os.path.dirname(target)) == "checkpoints":
            renames.append(target)
            if len(renames) == kill_at:  # the temporary file is complete; its rename never happens
                os.kill(os.getpid(), signal.SIGKILL)
        return rename(source, target)
    os.replace = replace_or_die
    Trainer.from_config(TrainConfig.load(config_path)).fit()
""")


def test_a_kill_at_any_rename_leaves_the_same_best_model(data_dir, tmp_path, monkeypatch):
    "A SIGKILL before each rename in checkpoints/, then a resume: best.pt and the model equal an unbroken run's."
    config = make_config(data_dir, tmp_path / "straight", keep_last=1, eval_every=2, max_steps=8, lr=3e-2)
    renames, rename = [], os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renames.append(str(target)), rename(source, target))[1])
    straight = Trainer.from_config(config)
    straight.fit()
    monkeypatch.undo()
    best = Checkpointer.load(tmp_path / "straight" / "checkpoints" / "best.pt")
    in_checkpoints = [t for t in renames if os.path.basename(os.path.dirname(t)) == "checkpoints"]
    assert any(t.endswith("best.pt") for t in in_checkpoints)
    (tmp_path / "child.py").write_text(KILL_AT_RENAME)
    for kill_at in range(1, len(in_checkpoints) + 1):
        out = tmp_path / f"killed-{kill_at}"
        config.replace(out_dir=str(out)).save(tmp_path / "config.json")
        done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "config.json"), str(kill_at),
                               str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert list(out.rglob(".*.tmp")), "the kill leaves a temporary file behind"
        if Checkpointer(out / "checkpoints").latest() is None:
            resumed = Trainer.from_config(config.replace(out_dir=str(out)))
        else:
            resumed = Trainer.resume(out)
        resumed.fit()
        assert not list(out.rglob(".*.tmp")), f"kill {kill_at}: stale temporary files were not removed"
        again = Checkpointer.load(out / "checkpoints" / "best.pt")
        assert again["step"] == best["step"], f"kill {kill_at}: best.pt is step {again['step']}, not {best['step']}"
        for name, weights in best["model"].items():
            assert torch.equal(weights, again["model"][name]), (kill_at, name)
        for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
            assert torch.equal(a, b), kill_at


class RunsCode:
    "Unpickling this calls print: what a stranger's file could do with os.system instead."
    def __reduce__(self):
        return (print, ("a stranger's checkpoint ran code",))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    from openllm_edu.checkpoint import CHECKPOINT_FORMAT
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "model": {}, "payload": RunsCode()}, tmp_path / "step_00000001.pt")
    with pytest.raises(CourseError, match="run code") as refused:
        Checkpointer.load(tmp_path)
    assert "\n" not in str(refused.value)
    assert "ran code" not in capsys.readouterr().out


def test_checkpoint_formats_older_load_newer_are_explained(data_dir, tmp_path):
    from openllm_edu.checkpoint import CHECKPOINT_FORMAT
    Trainer.from_config(make_config(data_dir, tmp_path / "run", max_steps=4)).fit()
    checkpoint = Checkpointer.find(tmp_path / "run")
    state = Checkpointer.load(checkpoint)
    assert state["format"] == CHECKPOINT_FORMAT and state["best_step"] == 4
    del state["best_step"]
    torch.save({**state, "format": "openllm_edu.checkpoint/1"}, checkpoint)  # as the first version wrote it
    upgraded = Checkpointer.load(checkpoint)
    assert upgraded["format"] == CHECKPOINT_FORMAT and upgraded["best_step"] is None
    resumed = Trainer.resume(tmp_path / "run", max_steps=6)
    resumed.fit()
    assert resumed.step == 6
    torch.save({**state, "format": "openllm_edu.checkpoint/99"}, checkpoint)
    with pytest.raises(CourseError, match="newer openllm-edu"):
        Checkpointer.load(checkpoint)


def test_garbage_report_json_is_one_line(data_dir, tmp_path):
    import shutil
    shutil.copytree(data_dir, tmp_path / "data")
    (tmp_path / "data" / "report.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(CourseError, match="report.json") as refused:
        Trainer.from_config(make_config(tmp_path / "data", tmp_path / "run"))
    assert "\n" not in str(refused.value) and "prepare" in str(refused.value)
    (tmp_path / "data" / "report.json").write_text('{"splits": {}}')
    with pytest.raises(CourseError, match="report.json"):
        Trainer.from_config(make_config(tmp_path / "data", tmp_path / "run"))


def test_missing_data_names_the_module_that_prepares_it(tmp_path):
    with pytest.raises(CourseError, match=r"openllm_edu\.fast_bpe\.prepare_data"):
        Trainer.from_config(TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run")))


def test_config_files_that_cannot_be_read_are_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("max_steps: 5\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(CourseError, match="UTF-8") as refused:
        TrainConfig.load(tmp_path / "latin1.yaml")
    assert "\n" not in str(refused.value)
    (tmp_path / "broken.yaml").write_text("max_steps: 5\nschedule: {max_lr: 0.1\neval_every: 3\n")
    with pytest.raises(CourseError, match=r"line \d+, column \d+") as refused:
        TrainConfig.load(tmp_path / "broken.yaml")
    assert "\n" not in str(refused.value)
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(CourseError, match="symbolic link loop"):
        TrainConfig.load(loop)


def test_without_tensorboard_the_run_says_so_and_logs_to_the_metrics_file(tmp_path, monkeypatch):
    "The tensorboard package is an extra: a plain install must still train, and say what it left out."
    import openllm_edu.loggers as loggers_module
    from openllm_edu.loggers import TensorBoardLogger, default_loggers

    config = TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"), tensorboard=True)
    assert any(isinstance(logger, TensorBoardLogger) for logger in default_loggers(config))  # installed here
    monkeypatch.setattr(loggers_module, "tensorboard_available", lambda: False)
    with pytest.warns(UserWarning, match=r"tensorboard package is not installed.*openllm-edu\[tensorboard\]"):
        loggers = default_loggers(config)
    assert [type(logger) for logger in loggers] == [JSONLinesLogger]


# --- samples at fixed prompts through training --------------------------------------------------------------

PROMPTS = ["ROMEO:\n", "To be"]


@pytest.fixture(scope="module")
def char_tokenizer(data_dir):
    tokenizer = make_tokenizer("char").train(shakespeare_documents(max_bytes=60_000))
    assert tokenizer.vocab_size == TrainData.load(data_dir).vocab_size  # the tokenizer the data was made with
    return tokenizer


def run_with_dropout(data_dir, out_dir, callbacks=(), **overrides) -> Trainer:
    "Dropout draws from the global random generator: a tracker that drew from it too would change the losses."
    values = {"max_steps": 10, "eval_every": 5, "model_overrides": {**SMALL_MODEL, "dropout": 0.2}, **overrides}
    return Trainer.from_config(make_config(data_dir, out_dir, **values), callbacks=callbacks)


def test_sample_tracker_fires_every_n_steps_and_logs_what_it_recorded(data_dir, tmp_path, char_tokenizer):
    tracker = SampleTracker(char_tokenizer, PROMPTS, every=4, config=GenerationConfig(max_new_tokens=8, seed=1))
    trainer = run_with_dropout(data_dir, tmp_path / "run", callbacks=[tracker])
    tracker.record(trainer)
    trainer.fit()
    assert [(s.step, s.prompt) for s in tracker.samples] == [(step, p) for step in (0, 4, 8) for p in PROMPTS]
    logged = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "samples" in row]
    assert [row["step"] for row in logged] == [4, 8]
    assert [row["samples"] for row in logged] == [{s.prompt: s.text for s in tracker.samples if s.step == step}
                                                  for step in (4, 8)]
    assert all(len(s.text) <= 8 for s in tracker.samples)  # at most a character per new token


def test_step_0_samples_are_what_generate_gives_for_the_initial_weights(data_dir, tmp_path, char_tokenizer):
    trainer = run_with_dropout(data_dir, tmp_path / "run")
    initial = copy.deepcopy(trainer.model)
    for config in (GenerationConfig(max_new_tokens=12, seed=5), GenerationConfig(max_new_tokens=12, temperature=0)):
        expected = [generate_text(initial, char_tokenizer, prompt, config) for prompt in PROMPTS]
        tracker = SampleTracker(char_tokenizer, PROMPTS, every=3, config=config)
        assert [(s.step, s.text) for s in tracker.record(trainer)] == [(0, text) for text in expected]
    assert trainer.model.training, "the model goes back to training mode"


def test_samples_are_deterministic_for_a_seed(data_dir, tmp_path, char_tokenizer):
    def samples(seed: int, out: str) -> list:
        tracker = SampleTracker(char_tokenizer, PROMPTS, every=3, config=GenerationConfig(max_new_tokens=12, seed=seed))
        run_with_dropout(data_dir, tmp_path / out, callbacks=[tracker], max_steps=6, eval_every=0).fit()
        return [(s.step, s.prompt, s.text) for s in tracker.samples]

    first = samples(7, "first")
    assert [step for step, _, _ in first] == [3, 3, 6, 6]
    assert samples(7, "again") == first
    assert samples(8, "other seed") != first


def test_the_sample_tracker_never_changes_the_training(data_dir, tmp_path, char_tokenizer):
    tracker = SampleTracker(char_tokenizer, PROMPTS, every=2, config=GenerationConfig(max_new_tokens=6, seed=0))
    tracked = run_with_dropout(data_dir, tmp_path / "tracked", callbacks=[tracker])
    tracker.record(tracked)
    tracked.fit()
    plain = run_with_dropout(data_dir, tmp_path / "plain")
    plain.fit()

    def losses(out: str) -> list:
        rows = [row for row in read_metrics(tmp_path / out / "metrics.jsonl") if "samples" not in row]
        return [{name: value for name, value in row.items() if name != "tokens_per_s"} for row in rows]  # timing varies

    assert len(tracker.samples) == 6 * len(PROMPTS) and len(losses("plain")) == 10 + 2
    assert losses("tracked") == losses("plain")
    assert all(torch.equal(a, b) for a, b in zip(tracked.model.parameters(), plain.model.parameters()))


def test_sample_tracker_refuses_what_would_not_be_reproducible(char_tokenizer):
    with pytest.raises(CourseError, match="seed=0"):
        SampleTracker(char_tokenizer, PROMPTS, every=2, config=GenerationConfig(max_new_tokens=4))
    with pytest.raises(CourseError, match="every=0"):
        SampleTracker(char_tokenizer, PROMPTS, every=0)
    SampleTracker(char_tokenizer, PROMPTS, every=2, config=GenerationConfig(max_new_tokens=4, temperature=0))
