"""Scaling laws and compute budgets (chapter 07, part 7): FLOP counts, isoFLOP sets and the fits."""
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from openllm_edu.core import CourseError
from openllm_edu.data import shakespeare_documents
from openllm_edu.fast_bpe import prepare_data
from openllm_edu.model import GPT, GPTConfig, flops_per_token, matmul_params
from openllm_edu.scaling import (
    IsoFlopRun,
    compute_optimal_size,
    fit_power_law,
    isoflop_configs,
    parabola_minimum,
    run_tokens,
    shape_family,
    six_n_d,
    train_isoflop_run,
    trainer_flops,
    training_flops,
)
from openllm_edu.tokenizer import make_tokenizer
from openllm_edu.train_config import TrainConfig
from openllm_edu.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaling-data")
    tokenizer = make_tokenizer("char").train(shakespeare_documents(max_bytes=60_000))
    prepare_data("shakespeare", tokenizer, folder / "data", val_fraction=0.2, max_bytes=60_000)
    return folder / "data"


@pytest.mark.parametrize("a, b", [(7.0, -0.076), (0.5, 0.5), (3e-4, 0.73)])
def test_fit_power_law_recovers_a_known_law(a, b):
    x = np.geomspace(1e3, 1e9, 7)
    fitted_a, fitted_b = fit_power_law(x, a * x ** b)
    assert math.isclose(fitted_a, a, rel_tol=1e-9) and math.isclose(fitted_b, b, rel_tol=1e-9)


def test_fit_power_law_through_noise_and_bad_input():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e9, 50)
    _, b = fit_power_law(x, 2.0 * x ** 0.5 * np.exp(rng.normal(0, 0.05, len(x))))
    assert abs(b - 0.5) < 0.01
    for x_bad, y_bad in (([1, 2], [1, -1]), ([0, 1], [1, 2]), ([1], [1]), ([1, 2, 3], [1, 2])):
        with pytest.raises(CourseError):
            fit_power_law(x_bad, y_bad)


def test_parabola_minimum_and_compute_optimal_size():
    sizes = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    valley = 0.2 * (np.log(sizes) - np.log(6e4)) ** 2 + 1.5
    n_opt, loss = parabola_minimum(sizes, valley)
    assert math.isclose(n_opt, 6e4, rel_tol=1e-6) and math.isclose(loss, 1.5, abs_tol=1e-9)
    assert compute_optimal_size(sizes, valley) == (pytest.approx(6e4), "parabola")
    assert parabola_minimum(sizes, -valley) is None  # opens downward
    assert parabola_minimum(sizes, (np.log(sizes) - np.log(1e8)) ** 2) is None  # bottom beyond the sizes
    assert compute_optimal_size(sizes, [3.0, 2.5, 2.2, 2.1, 2.0]) == (1e6, "best measured")
    with pytest.raises(CourseError):
        parabola_minimum(sizes[:2], valley[:2])


def test_shape_family_keeps_the_tiny_proportions():
    family = shape_family((1, 2, 4), vocab_size=4096, block_size=256)
    assert family[2] == GPTConfig.preset("tiny")
    assert [(c.n_layer, c.n_embd, c.head_dim) for c in family] == [(1, 32, 32), (2, 64, 32), (4, 128, 32)]
    assert [matmul_params(c) for c in family] == sorted(matmul_params(c) for c in family)
    with pytest.raises(CourseError):
        shape_family((0, 1), vocab_size=64, block_size=16)


def test_isoflop_configs_spend_the_budget():
    family = shape_family((1, 2, 3, 4, 5, 6), vocab_size=4096, block_size=256)
    budget = 2e11
    runs = isoflop_configs(budget, family, batch_size=8)
    assert len(runs) >= 3
    for run in runs:
        assert run.tokens == run.steps * 8 * 256 and run.steps >= 10
        assert run.flops == run.tokens * flops_per_token(run.config, 256)
        assert abs(run.flops / budget - 1) <= 1 / (2 * run.steps - 1)  # the nearest whole step: off by at most half a step
    assert [r.tokens for r in runs] == sorted((r.tokens for r in runs), reverse=True)  # bigger model, fewer tokens
    with pytest.raises(CourseError, match="raise the budget"):
        isoflop_configs(1e9, family, batch_size=8)


def test_isoflop_configs_round_to_the_nearest_step_at_any_budget():
    family = shape_family((1, 2, 3, 4), vocab_size=337, block_size=64, width_per_layer=16, head_dim=16)
    for budget in np.geomspace(2e10, 2e12, 61):
        for run in isoflop_configs(budget, family, batch_size=16):
            per_step = training_flops(run.config, run_tokens(1, 16, 64))
            assert abs(run.flops - budget) <= per_step / 2 and run.flops == run.steps * per_step


def counted_flops(step) -> dict:
    "FLOPs PyTorch counts while `step()` runs, by operator; attention as plain batched matmuls it can see."
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("seq_len, n_layer, n_embd, n_head", [(64, 2, 64, 2), (128, 1, 32, 1), (32, 3, 96, 3)])
def test_training_flops_match_pytorchs_flop_counter(seq_len, n_layer, n_embd, n_head):
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", vocab_size=256, block_size=seq_len, n_layer=n_layer, n_embd=n_embd,
                              n_head=n_head, bias=False)
    x = torch.randint(0, 256, (4, seq_len))

    def step():
        _, loss = GPT(config)(x, x)
        loss.backward()

    counted = counted_flops(step)
    assert abs(counted["aten.mm"] / six_n_d(config, x.numel()) - 1) < 0.01  # norm gains are not matmuls
    assert counted["aten.bmm"] == training_flops(config, x.numel()) - six_n_d(config, x.numel())
    attention = 12 * n_layer * n_head * config.head_dim * seq_len * x.numel()
    assert training_flops(config, x.numel()) == six_n_d(config, x.numel()) + attention


def test_flops_of_a_real_run(data_dir, tmp_path):
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), model="tiny",
                         model_overrides=dict(n_layer=2, n_head=2, n_embd=32, bias=False), block_size=32,
                         batch_size=4, grad_accum=2, max_steps=3, eval_every=0, precision="fp32", progress=False,
                         tensorboard=False)
    trainer = Trainer.from_config(config, loggers=[])
    counted = sum(counted_flops(trainer.train_step).values())
    per_step = run_tokens(1, 4, 32, grad_accum=2)
    assert abs(counted / training_flops(trainer.model.config, per_step) - 1) < 0.01
    trainer.fit()
    assert trainer.step == 3
    assert trainer_flops(trainer) == 3 * 2 * 4 * 32 * flops_per_token(trainer.model.config, 32)


def test_train_isoflop_run_spends_its_budget(data_dir, tmp_path):
    vocab = make_tokenizer("char").train(shakespeare_documents(max_bytes=60_000)).vocab_size
    family = shape_family((1, 2, 3), vocab_size=vocab, block_size=32, width_per_layer=16, head_dim=16)
    run = isoflop_configs(2e9, family, batch_size=4)[1]
    result = train_isoflop_run(run, data_dir, tmp_path / "run", batch_size=4, eval_tokens=1024)
    assert result["flops"] == run.flops == run.steps * 4 * 32 * flops_per_token(run.config, 32)
    assert abs(result["flops"] / 2e9 - 1) < 0.05 and math.isfinite(result["loss"])
    assert result["loss"] < math.log(vocab)  # it learned something in its steps
    with pytest.raises(CourseError, match="vocab_size"):
        wrong = IsoFlopRun(shape_family((1,), vocab_size=vocab + 1, block_size=32)[0], 1, 128, 0)
        train_isoflop_run(wrong, data_dir, tmp_path / "wrong", batch_size=4)
