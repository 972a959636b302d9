"""The `openllm-edu` command, run as a user runs it: a subprocess of the installed console script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "openllm-edu")

SAMPLE = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
          "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")


def openllm_edu(*args, env=None, cwd=None):
    environment = {**os.environ, "OPENLLM_EDU_PROFILE": "ci", **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=environment,
                          cwd=cwd, timeout=600)


def assert_clean_error(done, *words):
    "Exit status 2, one short line on stderr that names the problem, and no traceback."
    assert done.returncode == 2, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout
    message = done.stderr.strip()
    assert message.startswith("error:") or "usage:" in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text(SAMPLE * 40)
    return path


@pytest.fixture
def text_folder(tmp_path):
    "Twenty different documents, one per file, so that a hash split has something to split."
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(20):
        (folder / f"scene{i:02d}.txt").write_text(f"SCENE {i}.\n" + SAMPLE * (i + 1))
    return folder


def test_help_lists_every_command():
    done = openllm_edu("--help")
    assert done.returncode == 0
    for command in ("doctor", "run", "data", "tokenizer", "bench", "instructor", "grade"):
        assert command in done.stdout


def test_doctor_prints_one_verdict_per_line():
    done = openllm_edu("doctor")
    assert done.returncode in (0, 1)
    checks = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(checks) >= 10
    assert all(line.startswith(("[OK]", "[FAIL]")) for line in checks)
    assert {line.split(":")[0].split()[-1] for line in checks} >= {"python", "torch", "device", "bf16", "memory"}


@pytest.mark.parametrize("kind, vocab", [("char", 0), ("bpe", 200), ("sentencepiece", 5)])
def test_impossible_vocab_size(text_file, tmp_path, kind, vocab):
    done = openllm_edu("tokenizer", "train", "--kind", kind, "--vocab-size", vocab,
                       "--input", text_file, "--out", tmp_path / "tok")
    assert_clean_error(done, "vocab")
    assert not (tmp_path / "tok").exists()


def test_missing_input(tmp_path):
    done = openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300,
                       "--input", tmp_path / "nowhere.txt", "--out", tmp_path / "tok")
    assert_clean_error(done, "nowhere.txt")


def test_empty_and_binary_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    for path in (empty, binary):
        done = openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300,
                           "--input", path, "--out", tmp_path / "tok")
        assert_clean_error(done, path.name)


def test_broken_settings(tmp_path, text_file):
    broken = tmp_path / "settings.ini"
    broken.write_text((ROOT / "settings.ini").read_text().replace("batch_size = 8", "batch_size = eight", 1))
    done = openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300, "--input", text_file,
                       "--out", tmp_path / "tok", env={"OPENLLM_EDU_SETTINGS": str(broken)})
    assert_clean_error(done, "[profile.ci]", "batch_size", "eight")


def test_bad_flags_exit_2():
    assert openllm_edu("tokenizer", "train", "--kind", "words").returncode == 2
    assert openllm_edu("grade").returncode == 2


def test_missing_tokenizer_and_submission(tmp_path, text_file):
    done = openllm_edu("data", "prepare", "--corpus", text_file, "--tokenizer", tmp_path / "no-tokenizer",
                       "--out", tmp_path / "data")
    assert_clean_error(done, "no-tokenizer")
    assert_clean_error(openllm_edu("grade", tmp_path / "alice_01_data.ipynb"), "alice_01_data.ipynb")


def test_train_then_prepare(tmp_path, text_folder):
    done = openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300, "--input", text_folder,
                       "--out", tmp_path / "tok")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()

    done = openllm_edu("data", "prepare", "--corpus", text_folder, "--tokenizer", tmp_path / "tok",
                       "--out", tmp_path / "data", "--val-fraction", 0.3)
    assert done.returncode == 0, done.stderr
    documents = 0
    for split in ("train", "val"):
        sidecar = json.loads((tmp_path / "data" / f"{split}.json").read_text())
        itemsize = {"uint16": 2, "uint32": 4}[sidecar["dtype"]]
        assert sidecar["count"] == (tmp_path / "data" / f"{split}.bin").stat().st_size // itemsize > 0
        documents += sidecar["documents"]
    assert documents == 20


def test_main_job_on_the_ci_profile(tmp_path):
    done = openllm_edu("run", "--out", tmp_path / "main")
    assert done.returncode == 0, done.stderr
    assert "profile: ci" in done.stdout
    for name in ("tokenizer/tokenizer.json", "data/train.bin", "data/val.bin", "data/train.json"):
        assert (tmp_path / "main" / name).is_file(), name


def test_release_check_is_clean():
    done = openllm_edu("instructor", "release", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_single_document_corpus_warns_that_validation_is_empty(tmp_path, text_file):
    assert openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300, "--input", text_file,
                       "--out", tmp_path / "tok").returncode == 0
    done = openllm_edu("data", "prepare", "--corpus", text_file, "--tokenizer", tmp_path / "tok",
                       "--out", tmp_path / "data", "--val-fraction", 0.01)
    assert done.returncode == 0, done.stderr
    assert "val:        0 documents" in done.stdout and "warning:    no validation documents" in done.stdout


def test_output_folder_that_is_a_file(tmp_path, text_file):
    done = openllm_edu("tokenizer", "train", "--kind", "bpe", "--vocab-size", 300, "--input", text_file,
                       "--out", text_file)
    assert_clean_error(done, str(text_file))
    assert text_file.read_text() == SAMPLE * 40, "the file in the way must be left as it was"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    "A tiny untrained GPT with a byte-level BPE tokenizer, saved as `openllm-edu generate` expects."
    import torch

    from openllm_edu.model import GPT, GPTConfig, save_pretrained
    from openllm_edu.tokenizer import BPETokenizer

    tokenizer = BPETokenizer().train(SAMPLE * 20, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32))
    directory = tmp_path_factory.mktemp("model")
    save_pretrained(model, directory, tokenizer)
    return directory


def test_generate_is_reproducible_with_a_seed(saved_model):
    runs = [openllm_edu("generate", "--checkpoint", saved_model, "--prompt", "Now is the", "--max-new-tokens", 20,
                        "--top-k", 50, "--seed", 7) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("Now is the")
    greedy = openllm_edu("generate", "--checkpoint", saved_model, "--prompt", "Now is the", "--max-new-tokens", 20,
                         "--temperature", 0)
    assert greedy.returncode == 0 and greedy.stdout.startswith("Now is the"), greedy.stderr


def test_generate_bad_input(saved_model, tmp_path):
    assert_clean_error(openllm_edu("generate", "--checkpoint", saved_model, "--prompt", "x", "--top-p", 1.5),
                       "top_p")
    assert_clean_error(openllm_edu("generate", "--checkpoint", saved_model, "--prompt", SAMPLE * 5), "block_size")
    assert_clean_error(openllm_edu("generate", "--checkpoint", tmp_path / "nothing", "--prompt", "x"), "nothing")


# --- the main job: openllm-edu train -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    "A finished ci-sized `openllm-edu train` run (12 steps)."
    out = tmp_path_factory.mktemp("train") / "run"
    done = openllm_edu("train", "--out", out, "--max-steps", 12, "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_train_writes_a_complete_run_folder(trained_run):
    out, stdout = trained_run
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer", "checkpoints/best.pt",
                 "checkpoints/step_00000012.pt", "metrics.jsonl", "loss.png", "samples.txt", "summary.json",
                 "config.json", "data/train.bin", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    best = min(val, key=lambda r: r["val/loss"])
    assert summary["steps"] == 12 and summary["best_step"] == best["step"]
    assert summary["best_val_bits_per_byte"] == best["val/bits_per_byte"]
    assert f"{best['val/bits_per_byte']:.4f} bits/byte" in stdout and str(out) in stdout
    assert (out / "samples.txt").read_text().count("--- ") == 3


def test_train_saves_the_best_checkpoint_as_the_model(trained_run):
    import torch
    from safetensors.torch import load_file

    out, _ = trained_run
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(saved[name], best[name]) for name in saved)


def test_train_model_generates_and_the_run_resumes(trained_run, tmp_path):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    done = openllm_edu("generate", "--checkpoint", copy / "model", "--prompt", "ROMEO:", "--max-new-tokens", 10,
                       "--seed", 1)
    assert done.returncode == 0 and done.stdout.startswith("ROMEO:"), done.stderr
    done = openllm_edu("train", "--resume", copy, "--max-steps", 16, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((copy / "summary.json").read_text())["steps"] == 16
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 16  # resumed rows follow the first run's, none repeated


def test_resume_survives_a_torn_metrics_log(trained_run, tmp_path):
    "A full disk can leave half a line (or garbage) at the end of metrics.jsonl; resuming must still work."
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with open(copy / "metrics.jsonl", "ab") as log:
        log.write(b'{"step": 13, "train/lo\n\xff\xfe garbage\n')
    done = openllm_edu("train", "--resume", copy, "--max-steps", 14, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "skipped 2 damaged line(s)" in done.stderr and "Traceback" not in done.stderr
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 14


def test_train_refuses_to_overwrite_a_run(trained_run):
    out, _ = trained_run
    before = {p: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert_clean_error(openllm_edu("train", "--out", out, "--max-steps", 12, "--no-progress"), "resume")
    assert {p: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_train_bad_input(trained_run, tmp_path):
    out, _ = trained_run
    assert_clean_error(openllm_edu("train", "--preset", "huge", "--out", tmp_path / "a"), "char-baseline")
    assert_clean_error(openllm_edu("train", "--precision", "fp16", "--out", tmp_path / "b"), "CUDA")
    assert_clean_error(openllm_edu("train", "--precision", "fp64", "--out", tmp_path / "c"), "precision")
    assert_clean_error(openllm_edu("train", "--resume", tmp_path / "nothing"), "nothing")
    assert_clean_error(openllm_edu("train", "--resume", out, "--preset", "tiny"), "--resume")
    assert_clean_error(openllm_edu("train", "--config", tmp_path / "missing.json"), "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"max_stepz": 3}))
    assert_clean_error(openllm_edu("train", "--config", tmp_path / "bad.json", "--out", tmp_path / "d"), "max_stepz")
    (out / "checkpoints" / "step_99999999.pt").write_bytes(b"not a checkpoint")
    try:
        assert_clean_error(openllm_edu("train", "--resume", out), "damaged")
    finally:
        (out / "checkpoints" / "step_99999999.pt").unlink()


def test_train_config_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 6\neval_every: 3\nlr: 0.002\nmodel_overrides: {n_layer: 1}\n")
    done = openllm_edu("train", "--config", config, "--out", tmp_path / "run", "--max-steps", 4, "--no-progress")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["max_steps"] == 4 and saved["eval_every"] == 3 and saved["schedule"]["max_lr"] == 0.002  # flag > file > recipe
    assert saved["model_overrides"] == {"n_layer": 1} and saved["block_size"] == 64  # ci profile's block


def test_char_baseline_is_nanogpts_recipe_on_our_model(tmp_path):
    from openllm_edu.model import GPT, GPTConfig

    done = openllm_edu("train", "--preset", "char-baseline", "--out", tmp_path / "base", "--max-steps", 3,
                       "--no-progress")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert (saved["block_size"], saved["batch_size"], saved["schedule"]["max_lr"], saved["precision"]) == (64, 12, 1e-3, "fp32")
    tokenizer = json.loads((tmp_path / "base" / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "char"
    vocab = json.loads((tmp_path / "base" / "data" / "train.json").read_text())["vocab_size"]
    expected = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False))
    assert json.loads((tmp_path / "base" / "summary.json").read_text())["parameters"] == expected.num_params()


def test_speedrun_preset_trains_its_recipe(tmp_path):
    "The ten-minute recipe: tiny 128-wide, no biases, untied head, RoPE, 8 x 256 batches, linear decay, Muon, BPE 8,192."
    from openllm_edu.model import GPT, GPTConfig

    done = openllm_edu("train", "--preset", "speedrun", "--out", tmp_path / "run", "--max-steps", 2, "--no-progress")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"], saved["model_overrides"], saved["block_size"], saved["batch_size"]) == (
        "tiny", {"bias": False, "tie_embeddings": False, "pos": "rope"}, 256, 8)
    assert (saved["optimizer"]["name"], saved["optimizer"]["muon_lr_scale"]) == ("muon", 5.0)
    assert (saved["schedule"]["name"], saved["schedule"]["max_lr"], saved["schedule"]["min_lr"]) == ("linear", 3e-3, 3e-5)
    tokenizer = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "bpe"
    vocab = json.loads((tmp_path / "run" / "data" / "train.json").read_text())["vocab_size"]
    expected = GPT(GPTConfig(vocab_size=vocab, block_size=256, n_layer=4, n_head=4, n_embd=128, bias=False,
                             tie_embeddings=False, pos="rope"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["parameters"] == expected.num_params()


def test_bench_train_prints_the_trainer_against_the_bare_step():
    done = openllm_edu("bench", "train", "--preset", "tiny", "--block", 32, "--batch", 2, "--steps", 1, "--no-compile")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("train tiny", "Trainer.train_step tiny"))]
    assert [row.split()[0] for row in rows] == ["train", "Trainer.train_step"] * 2
    assert "vs bare" in done.stdout and "target" in done.stdout
    assert_clean_error(openllm_edu("bench", "train", "--preset", "tiny", "--steps", 0), "--steps")


# --- faults: damaged files, messages, a kill before best.pt, a rank that dies --------------------------------

def run_copy(trained_run, tmp_path):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy


def test_unreadable_config_files_are_one_line(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"max_steps": 3, "note": "caf\xe9"}'.encode("latin-1"))
    assert_clean_error(openllm_edu("train", "--config", tmp_path / "latin1.json", "--out", tmp_path / "a"), "UTF-8")
    (tmp_path / "broken.yaml").write_text("max_steps: 3\neval_every: [1, 2\n")
    done = openllm_edu("train", "--config", tmp_path / "broken.yaml", "--out", tmp_path / "b")
    assert_clean_error(done, "line 3, column 1")
    assert len(done.stderr.strip().splitlines()) == 1
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    assert_clean_error(openllm_edu("train", "--config", loop, "--out", tmp_path / "c"), "symbolic link loop")
    out_loop = tmp_path / "out-loop"
    out_loop.symlink_to(out_loop)
    assert_clean_error(openllm_edu("train", "--out", out_loop, "--max-steps", 2), "symbolic link loop")


def test_damaged_data_is_one_line_that_says_how_to_recover(trained_run, tmp_path):
    import numpy as np

    copy = run_copy(trained_run, tmp_path)
    report = (copy / "data" / "report.json").read_bytes()
    (copy / "data" / "report.json").write_bytes(b"\xff\xfe{ not a report")
    assert_clean_error(openllm_edu("train", "--resume", copy, "--max-steps", 14), "report.json", "prepare")
    (copy / "data" / "report.json").write_bytes(report)
    meta = json.loads((copy / "data" / "train.json").read_text())
    ids = np.memmap(copy / "data" / "train.bin", dtype=meta["dtype"], mode="r+")
    ids[5] = meta["vocab_size"]  # one id past the vocabulary
    ids.flush()
    del ids
    assert_clean_error(openllm_edu("train", "--resume", copy, "--max-steps", 14), "train.bin", "damaged",
                       "data prepare")


def test_generate_from_a_run_folder_uses_its_model(trained_run):
    out, _ = trained_run
    args = ("--prompt", "ROMEO:", "--max-new-tokens", 8, "--temperature", 0)
    from_run, from_model = (openllm_edu("generate", "--checkpoint", folder, *args) for folder in (out, out / "model"))
    assert from_run.returncode == 0 and from_model.returncode == 0, from_run.stderr + from_model.stderr
    assert from_run.stdout == from_model.stdout and from_run.stdout.startswith("ROMEO:")
    assert f"{out / 'model'}" in from_run.stderr and "run folder" in from_run.stderr
    assert "run folder" not in from_model.stderr


class RunsCode:
    def __reduce__(self):
        return (print, ("a stranger's checkpoint ran code",))


def test_a_checkpoint_that_would_run_code_is_refused(trained_run, tmp_path):
    import torch

    copy = run_copy(trained_run, tmp_path)
    latest = sorted((copy / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    torch.save({**state, "payload": RunsCode()}, copy / "checkpoints" / "step_00000013.pt")
    done = openllm_edu("train", "--resume", copy, "--max-steps", 14)
    assert_clean_error(done, "run code")
    assert "ran code" not in done.stdout + done.stderr


KILL_BEFORE_LAST_BEST = """
import os, signal, sys
rename = os.replace
def replace_or_die(source, target):
    target = str(target)
    if target.endswith("best.pt") and os.path.exists(os.path.join(os.path.dirname(target), "step_00000012.pt")):
        os.kill(os.getpid(), signal.SIGKILL)  # step_00000012.pt is written, best.pt still names the older best
    return rename(source, target)
os.replace = replace_or_die
from openllm_edu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_before_best_pt_still_leaves_the_best_model(trained_run, tmp_path):
    "A kill between step_N.pt and best.pt, then --resume: model/ holds the step summary.json names as best."
    import shutil

    import torch
    from safetensors.torch import load_file

    out, _ = trained_run
    run = tmp_path / "run"
    for prepared in ("data", "tokenizer"):  # skip preparing the corpus again
        shutil.copytree(out / prepared, run / prepared)
    environment = {**os.environ, "OPENLLM_EDU_PROFILE": "ci"}
    done = subprocess.run([sys.executable, "-c", KILL_BEFORE_LAST_BEST, "train", "--out", str(run), "--max-steps",
                           "12", "--no-progress"], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == -9, done.stderr
    assert list((run / "checkpoints").glob(".*.tmp")) or (run / "checkpoints" / "best.pt").is_file()
    done = openllm_edu("train", "--resume", run, "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert summary["best_step"] == best["step"] == 12
    saved = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(saved[name], best["model"][name]) for name in saved)
    assert not list(run.rglob(".*.tmp"))


SITE_KILLS_RANK_1 = """
import os
if os.environ.get("RANK") == "1":  # torchrun's second worker dies at its 16th all-reduce (after step 10's checkpoint)
    import signal
    import torch.distributed as dist
    calls, all_reduce = [], dist.all_reduce
    def all_reduce_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 16:
            os.kill(os.getpid(), signal.SIGKILL)
        return all_reduce(*args, **kwargs)
    dist.all_reduce = all_reduce_then_die
"""


def test_a_rank_killed_under_launch_is_one_line_with_the_resume_command(trained_run, tmp_path):
    import shutil

    out, _ = trained_run
    run = tmp_path / "run"
    for prepared in ("data", "tokenizer"):
        shutil.copytree(out / prepared, run / prepared)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE_KILLS_RANK_1)
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    done = openllm_edu("launch", "--nproc-per-node", 2, "train", "--out", run, "--max-steps", 20, "--no-progress",
                       "--precision", "fp32", env={"PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 was killed by SIGKILL"), done.stderr
    assert f"openllm-edu launch --nproc-per-node 2 train --resume {run}" in lines[0]


# --- chapter 10: compare -------------------------------------------------------------------------------------

def write_run_folder(folder, val_losses, batch_size=4):
    "A run folder as the Trainer leaves it: metrics.jsonl with a validation row every 10 steps, and config.json."
    folder.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "val/loss": loss, "val/bits_per_byte": loss / 2} for i, loss in enumerate(val_losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "config.json").write_text(json.dumps({"grad_accum": 1, "batch_size": batch_size, "block_size": 32}))
    return folder


def test_compare_prints_final_and_best_and_draws_the_curves(tmp_path):
    from openllm_edu.compare import compare_runs

    a = write_run_folder(tmp_path / "lr-high", [3.0, 2.5, 2.75])
    b = write_run_folder(tmp_path / "lr-low", [3.5, 3.25], batch_size=8)
    done = openllm_edu("compare", a, b, "--out", tmp_path / "curves.png")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["lr-high", "30", "3,840"] and "2.7500 / 2.5000" in lines[1]  # 30 steps x 4 x 32
    assert lines[2].split()[:3] == ["lr-low", "20", "5,120"] and "3.2500 / 3.2500" in lines[2]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = openllm_edu("compare", a, b, "--json", "--x", "step")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(compare_runs([a, b], x="step").to_dict()))


def test_compare_a_trained_run_agrees_with_its_summary(trained_run):
    out, _ = trained_run
    done = openllm_edu("compare", out, "--json")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(done.stdout)["runs"]
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert run["best"]["val/loss"] == summary["best_val_loss"] and run["steps"] == summary["steps"]
    assert run["tokens"] == summary["steps"] * config["batch_size"] * config["block_size"] * config["grad_accum"]


def test_compare_bad_input_is_one_line(tmp_path):
    good = write_run_folder(tmp_path / "good", [3.0])
    torn = write_run_folder(tmp_path / "torn", [3.0, 2.0])
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "val/lo\n')
    (tmp_path / "not-a-run").mkdir()
    assert_clean_error(openllm_edu("compare", good, tmp_path / "missing"), "missing")
    assert_clean_error(openllm_edu("compare", good, tmp_path / "not-a-run"), "metrics.jsonl")
    assert_clean_error(openllm_edu("compare", good, torn), "line 3")
    assert_clean_error(openllm_edu("compare"), "RUN_DIR")
    assert_clean_error(openllm_edu("compare", good, "--x", "time"), "--x")


# --- openllm-edu eval ---------------------------------------------------------------------------------------

EVAL_KEYS = {"checkpoint", "tokenizer", "profile", "limit", "batch_size", "openllm_edu", "torch", "device", "tasks",
             "languages"}
TASK_KEYS = {"task", "n", "accuracy", "accuracy_norm", "chance", "interval", "kind", "source", "fingerprint", "version",
             "seconds"}


@pytest.fixture(scope="module")
def course_checkpoint():
    "The cached ci course model: a trained model saved with its tokenizer (trained on first use)."
    from openllm_edu.model import course_model, course_model_dir

    course_model("ci")
    return course_model_dir("ci")


def write_user_task(path):
    lines = [{"context": "Now is the winter of our", "choices": [" discontent", " York", " house"], "gold": 0},
             {"context": "Made glorious summer by this sun of", "choices": [" York", " ocean"], "gold": 0},
             {"context": "In the deep bosom of the", "choices": [" ocean", " clouds"], "gold": 0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_eval_accuracy_is_evaluate_tasks_and_the_report_has_every_key(course_checkpoint, tmp_path):
    import torch

    from openllm_edu import __version__
    from openllm_edu.model import load_pretrained
    from openllm_edu.tasks import evaluate_task, load_task

    user_task, report_path = write_user_task(tmp_path / "mine.jsonl"), tmp_path / "report.json"
    done = openllm_edu("eval", "--checkpoint", course_checkpoint, "--task", "cloze", "--task", "speaker",
                       "--task", user_task, "--limit", 8, "--batch", 5, "--json", "--out", report_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert json.loads(report_path.read_text()) == report
    assert set(report) == EVAL_KEYS and all(set(entry) == TASK_KEYS for entry in report["tasks"])
    model, tokenizer = load_pretrained(course_checkpoint)
    assert (report["checkpoint"], report["profile"], report["limit"], report["batch_size"]) == (
        str(course_checkpoint.resolve()), "ci", 8, 5)
    assert (report["openllm_edu"], report["torch"]) == (__version__, torch.__version__)
    assert report["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    for entry, source in zip(report["tasks"], ["cloze", "speaker", str(user_task)], strict=True):
        task = load_task(source, "ci")
        direct = evaluate_task(model, tokenizer, task, limit=8, batch_size=5)
        assert entry["source"] == source and entry["fingerprint"] == task.fingerprint
        assert (entry["task"], entry["n"], entry["accuracy"], entry["accuracy_norm"], entry["chance"]) == (
            direct.task, direct.n, direct.accuracy, direct.accuracy_norm, direct.chance)
        assert tuple(entry["interval"]) == direct.interval
    assert [entry["n"] for entry in report["tasks"]] == [8, 8, 3]  # the file has 3 items: --limit cuts, never pads
    assert [entry["version"] for entry in report["tasks"]] == [1, 1, None]  # a user's file has no builder


def test_eval_a_run_folder_prints_a_table_and_writes_beside_its_model(trained_run, tmp_path):
    copy = run_copy(trained_run, tmp_path)
    done = openllm_edu("eval", "--checkpoint", copy, "--task", "lastword", "--task", write_user_task(tmp_path / "t.jsonl"),
                       "--limit", 3)
    assert done.returncode == 0, done.stderr
    assert f"{copy / 'model'}" in done.stderr and "run folder" in done.stderr
    header, *rows, last = done.stdout.strip().splitlines()
    assert header.split()[:4] == ["task", "items", "accuracy", "acc"] and last == f"report: {copy / 'model' / 'eval.json'}"
    assert [row.split()[:2] for row in rows] == [["lastword", "3"], ["t", "3"]]
    report = json.loads((copy / "model" / "eval.json").read_text())
    assert [f"{entry['accuracy']:.3f}" for entry in report["tasks"]] == [row.split()[2] for row in rows]


def test_eval_corpus_reports_held_out_bits_per_byte_per_language(course_checkpoint, tmp_path, monkeypatch):
    "The per-language rows are `bits_per_byte_by_language` on the held-out documents `data prepare` would keep aside."
    import warnings

    from openllm_edu.data import hash_split
    from openllm_edu.model import load_pretrained
    from openllm_edu.scoring import bits_per_byte_by_language
    from openllm_edu.sources import load_corpus

    fortunes = ROOT / "tests" / "fixtures" / "fortunes"
    done = openllm_edu("eval", "--checkpoint", course_checkpoint, "--task", "cloze", "--limit", 2, "--corpus",
                       "fortunes-de:1,fortunes-ru:1,shakespeare:1", "--max-bytes", 60_000, "--val-fraction", 0.5,
                       "--out", tmp_path / "report.json", env={"OPENLLM_EDU_FORTUNES": str(fortunes)})
    assert done.returncode == 0, done.stderr
    assert "held-out documents by language:" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    model, tokenizer = load_pretrained(course_checkpoint)
    monkeypatch.setenv("OPENLLM_EDU_FORTUNES", str(fortunes))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*latin1 is not UTF-8")
        docs, _ = load_corpus("fortunes-de:1,fortunes-ru:1,shakespeare:1", max_bytes=60_000)
    held_out = hash_split(docs, 0.5)[1]
    direct = bits_per_byte_by_language(model, tokenizer, held_out)
    assert [row["language"] for row in report["languages"]] == list(direct) and set(direct) == {"de", "ru", "en"}
    for row in report["languages"]:
        expected = direct[row["language"]]
        assert (row["documents"], row["tokens"], row["bytes"]) == (expected.documents, expected.tokens, expected.bytes)
        assert row["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
        assert f"{row['bits_per_byte']:.3f}" in done.stdout
    plain = openllm_edu("eval", "--checkpoint", course_checkpoint, "--task", "cloze", "--limit", 2, "--json",
                        "--out", tmp_path / "plain.json")
    assert plain.returncode == 0 and json.loads(plain.stdout)["languages"] is None


def test_eval_corpus_without_languages_is_one_line(course_checkpoint, text_folder, tmp_path):
    done = openllm_edu("eval", "--checkpoint", course_checkpoint, "--task", "cloze", "--limit", 2, "--corpus",
                       text_folder, "--val-fraction", 0.5, "--out", tmp_path / "r.json")
    assert_clean_error(done, "carry no language", "--corpus")
    assert not (tmp_path / "r.json").exists()


def test_eval_bad_input_is_one_line(course_checkpoint, saved_model, tmp_path):
    import shutil

    out = tmp_path / "report.json"
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(saved_model, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    bad_gold = tmp_path / "bad.jsonl"
    bad_gold.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "gold": 2}) + "\n")
    not_json = tmp_path / "notjson.jsonl"
    not_json.write_text("context: a\n")
    cases = [
        ((tmp_path / "nothing",), ("nothing",)),
        ((not_a_model,), ("config.json",)),
        ((no_tokenizer,), ("tokenizer", "save_pretrained")),
        ((course_checkpoint, "--task", "trivia"), ("trivia", "cloze")),
        ((course_checkpoint, "--task", tmp_path / "missing.jsonl"), ("missing.jsonl",)),
        ((course_checkpoint, "--task", bad_gold), ("bad.jsonl line 1", "out of range")),
        ((course_checkpoint, "--task", not_json), ("notjson.jsonl line 1", "not valid JSON")),
        ((course_checkpoint, "--limit", 0), ("--limit",)),
        ((course_checkpoint, "--batch", 0), ("--batch",)),
    ]
    for (checkpoint, *flags), words in cases:
        assert_clean_error(openllm_edu("eval", "--checkpoint", checkpoint, *flags, "--out", out), *words)
    assert not out.exists()


def test_bench_eval_prints_scoring_against_the_forward():
    done = openllm_edu("bench", "eval", "--preset", "tiny", "--block", 32, "--batch", 2, "--repeats", 1)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.startswith(("forward tiny 2x32", "score_rows tiny 2x32"))}
    assert set(rows) == {"forward", "score_rows"} and "vs forward" in done.stdout and "target" in done.stdout
    best = {what: float(row[5]) for what, row in rows.items()}  # what, preset, shape, precision, first s, best s
    printed = float(next(field for field in rows["score_rows"] if field.endswith("x")).rstrip("x"))
    assert printed == pytest.approx(best["forward"] / best["score_rows"], abs=0.01 + 0.002 / best["score_rows"])
    assert_clean_error(openllm_edu("bench", "eval", "--preset", "tiny", "--repeats", 0), "--repeats")

