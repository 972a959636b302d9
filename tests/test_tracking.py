"""Evaluation during training (chapter 10's EvalTracker on chapter 07's Trainer) and `openllm-edu train --track-tasks`:
the tracker changes no weight, logs at the steps it promises, and logs what evaluating the checkpoint of that step
gives."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openllm_edu.checkpoint import Checkpointer
from openllm_edu.compare import EvalTracker, generate_samples, generation_quality, read_run_metrics
from openllm_edu.core import CourseError
from openllm_edu.data import shakespeare_documents
from openllm_edu.fast_bpe import prepare_data
from openllm_edu.generate import GenerationConfig
from openllm_edu.model import GPT, GPTConfig
from openllm_edu.tasks import evaluate_task, load_task
from openllm_edu.tokenizer import make_tokenizer
from openllm_edu.train_config import TrainConfig
from openllm_edu.trainer import Trainer

SAMPLES = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)
PROMPTS = ("ROMEO:\n", "To be, or not")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracking-data")
    tokenizer = make_tokenizer("char").train(shakespeare_documents(max_bytes=60_000))
    prepare_data("shakespeare", tokenizer, folder / "data", val_fraction=0.2, max_bytes=60_000)
    return folder / "data", tokenizer


@pytest.fixture(scope="module")
def tasks():
    "A choice task (with a length-normalised accuracy) and a greedy one."
    return [load_task("speaker", "ci"), load_task("lastword", "ci")]


def make_config(data_dir, out_dir, **overrides) -> TrainConfig:
    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", block_size=80, batch_size=4,
                  model_overrides=dict(n_layer=2, n_head=2, n_embd=32, dropout=0.2),  # dropout draws random numbers
                  max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_tokens=256, precision="fp32",
                  progress=False, tensorboard=False, seed=5, log_every=1)
    return TrainConfig.from_dict({**values, **overrides})


def tracker_for(tokenizer, tasks, every=2) -> EvalTracker:
    return EvalTracker(tokenizer, tasks, every, limit=6, batch_size=4, prompts=PROMPTS, config=SAMPLES)


def train(config, callbacks=()) -> Trainer:
    trainer = Trainer.from_config(config, callbacks=callbacks)
    trainer.fit()
    return trainer


def same_weights(a: Trainer, b: Trainer) -> bool:
    first, second = a.model.state_dict(), b.model.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_tracker_changes_no_weight(prepared, tasks, tmp_path):
    data_dir, tokenizer = prepared
    tracker = tracker_for(tokenizer, tasks)
    modes = []

    def tracked(trainer):
        tracker(trainer)
        modes.append(trainer.model.training)

    plain = train(make_config(data_dir, tmp_path / "plain"))
    with_tracker = train(make_config(data_dir, tmp_path / "tracked"), [tracked])
    assert same_weights(plain, with_tracker)
    assert modes == [True] * 6, "the model is back in training mode after every call"
    # the check can fail: a callback that draws one global random number changes the dropout masks after it
    drawing = train(make_config(data_dir, tmp_path / "drawing"), [lambda trainer: torch.rand(1)])
    assert not same_weights(plain, drawing)


def test_rows_at_the_promised_steps_hold_what_the_checkpoints_give(prepared, tasks, tmp_path):
    data_dir, tokenizer = prepared
    config = make_config(data_dir, tmp_path / "run", max_steps=7, eval_every=3, keep_last=5)
    train(config, [tracker_for(tokenizer, tasks, every=3)])
    rows = [row for row in read_run_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/speaker/accuracy" in row]
    assert [row["step"] for row in rows] == [3, 6, 7], "every 3 steps, and at the last"
    for row in rows:
        state = Checkpointer.load(tmp_path / "run" / "checkpoints" / f"step_{row['step']:08d}.pt")
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
        speaker, lastword = (evaluate_task(model, tokenizer, task, limit=6, batch_size=4) for task in tasks)
        quality = generation_quality(generate_samples(model, tokenizer, PROMPTS, SAMPLES), model)
        assert row["eval/speaker/accuracy"] == speaker.accuracy
        assert row["eval/speaker/accuracy_norm"] == speaker.accuracy_norm
        assert row["eval/speaker/chance"] == speaker.chance
        assert row["eval/lastword/accuracy"] == lastword.accuracy and "eval/lastword/accuracy_norm" not in row
        assert row["samples/distinct_2_tokens"] == quality.distinct_2_tokens
        assert row["samples/repeated_4grams"] == quality.repeated_4grams
        assert row["samples/self_perplexity"] == pytest.approx(quality.self_perplexity, rel=1e-6)


def test_only_the_main_process_measures(prepared, tasks):
    _, tokenizer = prepared

    def log(metrics):
        raise AssertionError("a process other than the main one logged")

    other_rank = SimpleNamespace(strategy=SimpleNamespace(is_main=False), step=4, config=SimpleNamespace(max_steps=4),
                                 model=None, log=log)
    tracker_for(tokenizer, tasks)(other_rank)  # model=None: measuring would fail at once


def test_bad_tracker_arguments_are_course_errors(prepared, tasks):
    _, tokenizer = prepared
    for every in (0, -1, 2.5, True):
        with pytest.raises(CourseError, match="every"):
            EvalTracker(tokenizer, tasks, every)
    with pytest.raises(CourseError, match="limit"):
        EvalTracker(tokenizer, tasks, 2, limit=0)
    with pytest.raises(CourseError, match="reproducible"):
        EvalTracker(tokenizer, tasks, 2, config=GenerationConfig(max_new_tokens=4))


# --- openllm-edu train --track-tasks -------------------------------------------------------------------------

CLI = str(Path(sys.executable).parent / "openllm-edu")


def openllm_edu(*args):
    environment = {**os.environ, "OPENLLM_EDU_PROFILE": "ci"}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def run_config(prepared, tmp_path_factory):
    "A config file for a run of a few seconds: the prepared data, its tokenizer beside it, a small model."
    data_dir, tokenizer = prepared
    tokenizer.save(data_dir.parent / "tokenizer")
    path = tmp_path_factory.mktemp("tracking-config") / "run.json"
    path.write_text(json.dumps(dict(data_dir=str(data_dir), model_overrides=dict(n_layer=1, n_head=2, n_embd=32),
                                    block_size=80, batch_size=4, eval_every=3, eval_tokens=256, precision="fp32")))
    return path


def test_train_tracks_the_tasks_it_is_given(run_config, tmp_path):
    done = openllm_edu("train", "--config", run_config, "--out", tmp_path / "run", "--max-steps", 5, "--no-progress",
                       "--track-tasks", "speaker,lastword", "--track-every", 2, "--track-limit", 5)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [row for row in read_run_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/speaker/accuracy" in row]
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert all({"eval/lastword/accuracy", "samples/self_perplexity"} <= row.keys() for row in rows)
    assert "tracked:  speaker, lastword" in done.stdout
    # the default is the run's eval_every (3 here); without --track-tasks nothing is tracked
    done = openllm_edu("train", "--config", run_config, "--out", tmp_path / "default", "--max-steps", 5,
                       "--no-progress", "--track-tasks", "lastword")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_run_metrics(tmp_path / "default" / "metrics.jsonl")
    assert [row["step"] for row in rows if "eval/lastword/accuracy" in row] == [3, 5]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["tracked_tasks"] == ["lastword"]


@pytest.mark.parametrize("flags, words", [
    (["--track-tasks", "cloze,nosuch"], "unknown task 'nosuch'"),
    (["--track-tasks", "cloze,,speaker"], "empty name"),
    (["--track-tasks", "cloze", "--track-every", 0], "--track-every"),
    (["--track-tasks", "cloze", "--track-limit", -3], "--track-limit"),
])
def test_bad_tracking_flags_stop_before_any_work(run_config, tmp_path, flags, words):
    done = openllm_edu("train", "--config", run_config, "--out", tmp_path / "run", "--max-steps", 2, *flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error:") and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists(), "nothing trained, nothing written"


def test_tracking_needs_the_tokenizer_beside_the_data(prepared, tmp_path):
    data_dir, _ = prepared
    bare = tmp_path / "bare"
    (bare / "data").mkdir(parents=True)
    for path in data_dir.iterdir():
        (bare / "data" / path.name).write_bytes(path.read_bytes())
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dict(data_dir=str(bare / "data"), model_overrides=dict(n_layer=1, n_head=2, n_embd=32),
                                      block_size=80, batch_size=4, precision="fp32")))
    done = openllm_edu("train", "--config", config, "--out", tmp_path / "run", "--max-steps", 2, "--track-tasks", "cloze")
    assert done.returncode == 2 and "no tokenizer/ folder" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
