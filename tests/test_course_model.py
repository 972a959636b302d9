"""The course model of chapter 05: `train_briefly` learns and is deterministic; `course_model()` trains once per
profile and recipe, is shared by processes that ask at the same moment, loads from its cache afterwards, and is
retrained (with a one-line message) when its cached copy is damaged. All under the ci profile."""
import hashlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import openllm_edu.model as model_module
from openllm_edu.core import CourseError
from openllm_edu.metrics import evaluate_lm
from openllm_edu.model import (
    GPT,
    GPTConfig,
    course_data,
    course_model,
    course_model_dir,
    course_model_report,
    train_briefly,
)

TRAINED = "course model: training"
CHILD = textwrap.dedent("""
    import hashlib
    from openllm_edu.model import course_model
    model, tokenizer = course_model("ci")
    weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    print("weights", weights, tokenizer.fingerprint)
""")


def weights_digest(model) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_CACHE", str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------ train_briefly
def counting_losses(seed: int, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=16, block_size=8, n_layer=1))
    return train_briefly(model, torch.arange(16).repeat(50), steps=steps, batch_size=8, block_size=8, seed=seed)


def test_train_briefly_learns_a_counting_sequence_and_is_deterministic():
    losses = counting_losses(seed=0)
    assert len(losses) == 30 and abs(losses[0] - math.log(16)) < 0.3
    assert losses[-1] < 0.2 * losses[0], losses
    assert counting_losses(seed=0) == losses
    assert counting_losses(seed=1) != losses


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=1.5), dict(lr=0.0)])
def test_train_briefly_refuses_bad_arguments(bad):
    model = GPT(GPTConfig.preset("tiny", vocab_size=16, block_size=8, n_layer=1))
    with pytest.raises(CourseError, match=next(iter(bad))):
        train_briefly(model, torch.arange(64) % 16, **{**dict(steps=2, batch_size=2, block_size=8), **bad})


# ------------------------------------------------------------------ the cache key
def test_the_folder_changes_with_the_profile_and_the_recipe_version(own_cache, monkeypatch):
    ci = course_model_dir("ci")
    assert ci.parent == own_cache / "course_model" and ci.name.startswith("ci-")
    assert course_model_dir("laptop") != ci and course_model_dir("ci") == ci
    monkeypatch.setattr(model_module, "COURSE_MODEL_VERSION", model_module.COURSE_MODEL_VERSION + 1)
    assert course_model_dir("ci") != ci, "a new recipe version retrains"


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENLLM_EDU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert course_model_dir("ci").parent == tmp_path / "xdg" / "openllm_edu" / "course_model"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert course_model_dir("ci").parent == tmp_path / "home" / ".cache" / "openllm_edu" / "course_model"


def test_a_report_before_any_training_says_what_to_do(own_cache):
    with pytest.raises(CourseError, match=r"course_model\(\) first"):
        course_model_report("ci")


# ------------------------------------------------------------------ one training, shared
def test_processes_asking_at_once_train_once_then_everyone_loads_the_copy(own_cache, monkeypatch, capfd):
    env = {**os.environ, "OPENLLM_EDU_CACHE": str(own_cache), "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [child.communicate(timeout=600) for child in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err[-2000:]
    assert sum(err.count(TRAINED) for _, err in results) == 1, [err for _, err in results]
    answers = {line for out, _ in results for line in out.splitlines() if line.startswith("weights")}
    assert len(answers) == 1, answers

    def no_training(profile=None):
        raise AssertionError("the cached copy should have been loaded")

    monkeypatch.setattr(model_module, "train_course_model", no_training)
    model, tokenizer = course_model("ci")  # this process: from the cache
    assert f"weights {weights_digest(model)} {tokenizer.fingerprint}" in answers
    assert TRAINED not in capfd.readouterr().err


def test_a_damaged_copy_is_reported_in_one_line_and_trained_again(own_cache, capfd):
    first, _ = course_model("ci")
    folder = course_model_dir("ci")
    assert capfd.readouterr().err.count(TRAINED) == 1
    (folder / "model.safetensors").write_bytes(b"half a file")
    again, _ = course_model("ci")
    err = capfd.readouterr().err
    damaged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and str(folder) in damaged[0] and "Traceback" not in err
    assert err.count(TRAINED) == 1
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):  # the same recipe, retrained
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    course_model("ci")
    assert TRAINED not in capfd.readouterr().err, "the retrained copy is used from then on"


# ------------------------------------------------------------------ it learned (the shared default cache)
def test_the_course_model_learned():
    model, tokenizer = course_model("ci")
    report = course_model_report("ci")
    losses = report["losses"]
    assert len(losses) == report["recipe"]["steps"]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, "the loss at the end is well below the loss at step 0"
    data = course_data("ci")  # evaluated again here, on the validation split built afresh
    assert tokenizer.fingerprint == data.tokenizer.fingerprint
    held_out = evaluate_lm(model, data.val, data.val_bytes, block_size=model.config.block_size)
    uniform_bits = math.log2(tokenizer.vocab_size) * held_out.tokens / held_out.bytes
    assert held_out.bits_per_byte < uniform_bits - 0.3, (held_out.bits_per_byte, uniform_bits)
    assert held_out.bits_per_byte == pytest.approx(report["held_out"]["bits_per_byte"], abs=1e-4)
