"""`openllm-edu finetune` and `openllm-edu chat` on the cached ci course model: the saved chat model is the one the
report graded, LoRA fine-tuning saves a plain merged model, chat answers through a pipe as greedy_reply does, drops
the oldest turns when the context is full, and bad input is one line with exit status 2."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from openllm_edu.chat import ChatTokenizer, load_chat_model, render_conversation, resize_embeddings
from openllm_edu.cli import CLI_WORKER, FINETUNE_FAMILIES, main
from openllm_edu.finetune import (
    FAMILIES,
    READING,
    exact_match,
    fits_block,
    greedy_reply,
    instruction_data,
    write_conversations,
)
from openllm_edu.model import course_model, course_model_dir, load_pretrained

ROOT = Path(__file__).resolve().parent.parent
REPORT_KEYS = {"checkpoint", "data", "method", "steps", "lr", "batch_size", "replay", "limit", "families", "items", "profile", "train_conversations",
               "trainable_parameters", "held_out", "constant", "before", "after", "seconds"}


def openllm_edu(*args, stdin=None):
    environment = {**os.environ, "OPENLLM_EDU_PROFILE": "ci", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CLI_WORKER, *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=environment, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def checkpoint():
    course_model("ci")
    return course_model_dir("ci")


@pytest.fixture(scope="module")
def tuned(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "chat"
    done = openllm_edu("finetune", "--checkpoint", checkpoint, "--steps", 10, "--limit", 2, "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(autouse=True)
def ci_profile(monkeypatch):
    monkeypatch.setenv("OPENLLM_EDU_PROFILE", "ci")


def test_finetune_saves_a_chat_model_graded_as_the_report_says(checkpoint, tuned):
    out, done = tuned
    report = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert set(report) == REPORT_KEYS and report["method"] == "full" and report["steps"] == 10
    assert "exact match" in done.stdout and "bits per byte" in done.stdout
    model, chat = load_chat_model(out)
    base_model, base = load_pretrained(checkpoint)
    assert chat.vocab_size == base.vocab_size + 5 == model.config.vocab_size
    assert report["families"] == list(READING) == list(FINETUNE_FAMILIES) and report["items"] == 3000
    held = {family: fits_block(items, chat, 64)[:2]  # the ci model's block: one-line passages
            for family, items in instruction_data("ci", READING, n_per_family=3000, lines=1)["held_out"].items()}
    assert exact_match(model, chat, held) == report["after"]["exact_match"]
    for family, items in held.items():  # the floor printed beside each family: the most common answer's share
        answers = [messages[-1]["content"] for messages in items]
        assert report["constant"][family] == max(answers.count(a) for a in answers) / len(answers)
    assert report["lr"] == 1e-3 and report["replay"] == 0.25 and report["batch_size"] == 16
    assert "one constant answer" in done.stdout
    template = jinja2.Template((out / "chat_template.jinja").read_text(encoding="utf-8"))
    messages = held["count"][0]
    assert chat.encode_with_specials(template.render(messages=messages)) == render_conversation(chat, messages)[0]
    assert exact_match(resize_embeddings(base_model, chat.vocab_size), chat, held) == report["before"]["exact_match"]
    assert report["before"]["bits_per_byte"] != report["after"]["bits_per_byte"]


def test_lora_finetune_on_a_file_saves_a_plain_merged_model(checkpoint, tmp_path, capsys):
    items = instruction_data("ci", n_per_family=5, lines=1)["train"]
    data = write_conversations(items, tmp_path / "mine.jsonl")
    used = fits_block([m for k, m in enumerate(items) if k % 10 != 9], ChatTokenizer(course_model()[1]), 64)
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--lora", "2", "--steps", "3",
                 "--limit", "1", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "finetune.json").read_text(encoding="utf-8"))
    assert report["method"] == "lora r=2" and set(report["after"]["exact_match"]) == {"all"}
    assert report["families"] is None and report["items"] is None  # they choose chat items only
    assert report["after"]["exact_match"]["all"]["n"] == 1 and report["train_conversations"] == len(used)
    model, chat = load_chat_model(tmp_path / "lora")  # strict load: no adapter weights were left in
    assert report["trainable_parameters"] < sum(p.numel() for p in model.parameters())
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--steps", "1", "--limit", "1",
                 "--out", str(tmp_path / "lora")]) == 0  # an earlier finetune output is replaced


def test_finetune_on_all_chat_families(checkpoint, tmp_path):
    assert main(["finetune", "--checkpoint", str(checkpoint), "--families", "all", "--items", "5", "--steps", "1",
                 "--limit", "1", "--out", str(tmp_path / "all")]) == 0
    report = json.loads((tmp_path / "all" / "finetune.json").read_text(encoding="utf-8"))
    assert report["families"] == list(FAMILIES) == list(report["after"]["exact_match"]) and report["items"] == 5
    assert report["train_conversations"] <= 5 * len(FAMILIES)


def test_chat_through_a_pipe_answers_as_greedy_reply_does(tuned):
    out, _ = tuned
    done = openllm_edu("chat", "--checkpoint", out, "--temperature", 0, "--max-new-tokens", 8,
                       stdin="hello\n/reset\nhi\n/quit\nnever read\n")
    assert done.returncode == 0, done.stderr
    model, chat = load_chat_model(out)
    replies = [greedy_reply(model, chat, [{"role": "user", "content": text}], 8)[0] for text in ("hello", "hi")]
    assert done.stdout == "".join(reply + "\n" for reply in replies)  # /reset: "hi" starts a new conversation


def chat_session(monkeypatch, capsys, folder, lines, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    status = main(["chat", "--checkpoint", str(folder), "--temperature", "0", *flags])
    return status, capsys.readouterr()


def test_chat_takes_a_message_of_several_lines_ending_each_but_the_last_with_a_backslash(tuned, monkeypatch, capsys):
    out, _ = tuned
    question = "Who speaks first in this passage?\nCELIA:\nI pray you, bear with me."
    typed = question.replace("\n", "\\\n") + "\n/reset\nhi \\\n"  # the last one ends at the end of the input
    status, seen = chat_session(monkeypatch, capsys, out, typed, "--max-new-tokens", "8")
    model, chat = load_chat_model(out)
    replies = [greedy_reply(model, chat, [{"role": "user", "content": text}], 8)[0] for text in (question, "hi ")]
    assert status == 0 and seen.out == "".join(reply + "\n" for reply in replies), seen


def test_chat_drops_the_oldest_turns_and_refuses_a_message_too_long(tuned, monkeypatch, capsys):
    out, _ = tuned
    status, seen = chat_session(monkeypatch, capsys, out, "good morning\n" * 4, "--max-new-tokens", "40")
    assert status == 0 and "dropped the 2 oldest messages" in seen.err, seen
    status, seen = chat_session(monkeypatch, capsys, out, "word " * 40 + "\nhi\n", "--max-new-tokens", "8")
    assert status == 0 and "does not fit" in seen.err and len(seen.out.split("\n")) == 2, seen  # then answers "hi"


def test_bad_input_is_one_line_and_exit_2(checkpoint, tuned, tmp_path, monkeypatch, capsys):
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("keep me")
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("{not json\n")
    finetune = ["finetune", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "new")]
    cases = {"no saved model": ["finetune", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
             "no conversation file": [*finetune, "--data", str(tmp_path / "missing.jsonl")],
             "line 1": [*finetune, "--data", str(bad_file)],
             "--lora 0": [*finetune, "--lora", "0"], "--steps 0": [*finetune, "--steps", "0"],
             "--items 0": [*finetune, "--items", "0"], "--batch 0": [*finetune, "--batch", "0"],
             "poetry": [*finetune, "--families", "first,poetry"], "use some of": [*finetune, "--families", ","],
             "does not exist": [*finetune, "--data", f"squad:{tmp_path / 'missing.json'}"],
             "replay=1.0": [*finetune, "--replay", "1"], "--lr 0.0": [*finetune, "--lr", "0"], "--lr 2.0": [*finetune, "--lr", "2"],
             "holds other files": ["finetune", "--checkpoint", str(checkpoint), "--out", str(crowded)],
             "openllm-edu finetune": ["chat", "--checkpoint", str(checkpoint)],
             "--max-new-tokens 64": ["chat", "--checkpoint", str(tuned[0]), "--max-new-tokens", "64"]}
    for words, argv in cases.items():
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and words in err, (argv, err)
    assert (crowded / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()
