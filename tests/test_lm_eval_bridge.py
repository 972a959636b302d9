"""Chapter 10b: our models inside lm-evaluation-harness, with the harness as the referee of our scorer.

The harness runs offline on tiny task files built from the held-out corpus: its accuracy must equal
`evaluate_task`'s, item by item, and what it does with our answers (which choice wins under each normalisation) must
follow from our scorer's numbers. Every socket and name lookup is refused while it runs, so a download attempt fails
the test instead of waiting on the network.
"""
import json
import socket
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from openllm_edu import scoring
from openllm_edu.core import CourseError
from openllm_edu.generate import GenerationConfig, generate_text
from openllm_edu.lm_eval_bridge import (
    CourseLM,
    harness_generation_config,
    harness_lm,
    run_harness_task,
    write_harness_task,
)
from openllm_edu.model import course_data, course_model
from openllm_edu.tasks import builtin_task, evaluate_task, read_task_file, write_task_file

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness is not installed: pip install 'openllm-edu[eval]'")
N_ITEMS = 16


class Request:
    "What CourseLM reads of an lm_eval Instance: its args."
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    "Refuse every connection and name lookup while the harness runs; the list records what was attempted."
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"network access attempted in an offline test: {args}")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(sock, address)

    real_connect = socket.socket.connect
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield attempts


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return course_model("ci")


@pytest.fixture(scope="module")
def cloze_file(tmp_path_factory):
    "Chapter 10's cloze task (held-out scenes), written as chapter 10 writes it: a header line, then the items."
    task = builtin_task("cloze", "ci")
    assert len(task.items) > N_ITEMS
    return task, write_task_file(task, tmp_path_factory.mktemp("cloze") / "cloze.jsonl")


def harness_samples(task_file, folder, lm):
    "lm_eval's per-document records for our task file, run with `lm` (the harness's own entry point)."
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    config = write_harness_task(task_file, folder)
    out = simple_evaluate(model=lm, tasks=[config.stem], bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    return sorted(out["samples"][config.stem], key=lambda sample: sample["doc_id"])


def first_best(values) -> int:
    "Index of the largest value, the first on a tie (numpy's argmax, the harness's rule)."
    return max(range(len(values)), key=lambda i: (values[i], -i))


@needs_lm_eval
def test_harness_accuracy_equals_evaluate_task(offline, model_and_tokenizer, cloze_file, tmp_path):
    model, tokenizer = model_and_tokenizer
    task, path = cloze_file
    harness = run_harness_task(model, tokenizer, path, folder=tmp_path, limit=N_ITEMS)
    ours = evaluate_task(model, tokenizer, task, limit=N_ITEMS)
    assert harness["n"] == ours.n == N_ITEMS
    assert 0 < ours.accuracy < 1, "a task the model gets all right or all wrong would not test the equality"
    assert harness["acc"] == ours.accuracy
    assert harness["acc_bytes"] == ours.accuracy_norm  # both divide by UTF-8 bytes
    assert all(choice.isascii() for item in task.items[:N_ITEMS] for choice in item.choices)
    assert harness["acc_norm"] == ours.accuracy_norm  # per character = per byte on ASCII choices
    harness_items = (tmp_path / f"{task.name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in harness_items] == [
        {"context": item.context, "choices": list(item.choices), "gold": item.gold} for item in task.items]
    assert (tmp_path / f"{task.name}.yaml").is_file() and (tmp_path / "datasets").is_dir()
    assert offline == []


@needs_lm_eval
def test_harness_scores_each_choice_with_our_numbers(offline, model_and_tokenizer, cloze_file, tmp_path):
    """Per document: the harness asks (context, choice) as written in the file, gets our scorer's numbers back, and
    its acc / acc_norm / acc_bytes follow from them (acc_norm per character, acc_bytes per byte), also on
    accented choices, where characters and bytes differ."""
    model, tokenizer = model_and_tokenizer
    task, _ = cloze_file
    items = [{"context": item.context, "choices": list(item.choices), "gold": item.gold} for item in task.items[:8]]
    items += [{"context": "Good morrow, sweet", "choices": [" Roméo", " Romeo", " señor", " sir"], "gold": 1},
              {"context": "ROMEO:\nO", "choices": [" naïve", " Juliet", " café"], "gold": 1}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    samples = harness_samples(path, tmp_path / "harness", harness_lm(model, tokenizer, batch_size=4))
    assert [sample["doc_id"] for sample in samples] == list(range(len(items)))
    # The harness sends all requests in one call, document by document; scored the same way, in batches of the
    # same size, our numbers must come back exactly (other batches could differ in the last bits).
    all_scores = iter(scoring.loglikelihood(model, tokenizer, [(item["context"], choice) for item in items
                                                               for choice in item["choices"]], batch_size=4))
    for item, sample in zip(items, samples):
        pairs = [(item["context"], choice) for choice in item["choices"]]
        assert [tuple(arguments) for arguments in sample["arguments"]] == pairs
        scores = [next(all_scores) for _ in pairs]
        answered = [response[0] for response in sample["resps"]]
        assert answered == [(s.logprob, s.is_greedy) for s in scores]
        logprobs = [s.logprob for s in scores]
        chars = [s.logprob / len(choice) for s, choice in zip(scores, item["choices"])]
        utf8_bytes = [s.logprob / s.n_bytes for s in scores]
        assert [s.n_bytes for s in scores] == [len(choice.encode("utf-8")) for choice in item["choices"]]
        assert sample["acc"] == float(first_best(logprobs) == item["gold"])
        assert sample["acc_norm"] == float(first_best(chars) == item["gold"])
        assert sample["acc_bytes"] == float(first_best(utf8_bytes) == item["gold"])
    assert offline == []


@needs_lm_eval
def test_greedy_task_is_loglikelihood_acc(offline, model_and_tokenizer, tmp_path):
    """A "greedy" task becomes output_type loglikelihood, whose acc (every token the model's top choice) must equal
    evaluate_task's accuracy. Half of the continuations are the model's own greedy text, so some items pass."""
    model, tokenizer = model_and_tokenizer
    text = tokenizer.decode(course_data("ci").val[:4000].tolist())
    contexts = [text[i:i + 60] for i in range(0, 60 * 8, 60)]
    greedy = GenerationConfig(max_new_tokens=3, temperature=0.0)
    items = [{"context": c, "choices": [generate_text(model, tokenizer, c, greedy) if i % 2 else " Juliet"], "gold": 0}
             for i, c in enumerate(contexts)]
    path = tmp_path / "greedy.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    task = read_task_file(path)
    assert task.kind == "greedy"
    harness = run_harness_task(model, tokenizer, path, folder=tmp_path / "harness")
    ours = evaluate_task(model, tokenizer, task)
    expected = np.mean([s.is_greedy for s in scoring.loglikelihood(model, tokenizer, [
        (item["context"], item["choices"][0]) for item in items])])
    assert harness["n"] == ours.n == len(items)
    assert harness["acc"] == ours.accuracy == expected > 0
    assert set(harness) == {"acc", "n"}
    assert offline == []


@needs_lm_eval
def test_rolling_loglikelihood_is_our_scorer_and_the_harness_windows(model_and_tokenizer):
    "Within one window, lm_eval's own rolling windows (scored by plain forward passes) give the same number."
    import lm_eval.utils
    model, tokenizer = model_and_tokenizer
    block = model.config.block_size
    text = tokenizer.decode(course_data("ci").val[:3000].tolist())
    short = tokenizer.decode(tokenizer.encode(text)[:block - 5])
    assert len(tokenizer.encode(short)) <= block < len(tokenizer.encode(text))
    texts = [short, text]
    lm = harness_lm(model, tokenizer, stride=block // 2)
    answered = lm.loglikelihood_rolling([Request(t) for t in texts])
    assert answered == [s.logprob for s in scoring.loglikelihood_rolling(model, tokenizer, texts, stride=block // 2)]
    ids = tokenizer.encode(short)
    (inputs, predicted), = lm_eval.utils.get_rolling_token_windows(ids, prefix_token=tokenizer.eos_id,
                                                                   max_seq_len=block, context_len=1)
    with torch.no_grad():
        logits, _ = model(torch.tensor([inputs]))
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    reference = logprobs[torch.arange(len(predicted)), torch.tensor(predicted)].sum().item()
    assert answered[0] == pytest.approx(reference, rel=1e-4)


@needs_lm_eval
def test_generate_until_is_chapter_06_generation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lm = CourseLM(model, tokenizer)  # the answers need no harness
    prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo"]
    answers = lm.generate_until([Request(p, {"until": ["\n"], "max_gen_toks": 12}) for p in prompts])
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_strings=("\n",))
    assert answers == [generate_text(model, tokenizer, p, config) for p in prompts]
    long_prompt = tokenizer.decode(course_data("ci").val[:5 * model.config.block_size].tolist())
    assert len(tokenizer.encode(long_prompt)) > model.config.block_size
    (answer,) = lm.generate_until([Request(long_prompt, {"until": "\n\n", "max_gen_toks": 8})])
    assert isinstance(answer, str) and "\n\n" not in answer and len(tokenizer.encode(answer)) <= 8


@needs_lm_eval
def test_generation_settings_follow_the_harness():
    "lm-eval 0.4.13's rules: greedy unless do_sample, or a temperature above 0 without do_sample; token aliases."
    greedy = harness_generation_config({"until": ["\n\n", "Q:"], "max_gen_toks": 32, "do_sample": False,
                                        "temperature": 0.9})
    assert (greedy.temperature, greedy.max_new_tokens, greedy.stop_strings) == (0.0, 32, ("\n\n", "Q:"))
    default = harness_generation_config({})
    assert (default.temperature, default.max_new_tokens, default.stop_strings) == (0.0, 256, ())
    assert harness_generation_config({"max_new_tokens": 9, "until": "\n"}).max_new_tokens == 9
    assert harness_generation_config({"temperature": 0.8}).temperature == 0.8
    sampled = harness_generation_config({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "until": "\n"})
    assert (sampled.temperature, sampled.top_p, sampled.stop_strings) == (0.7, 0.9, ("\n",))
    with pytest.raises(CourseError, match="num_beams"):
        harness_generation_config({"until": ["\n"], "num_beams": 4})


def test_bad_task_file_fails_before_the_harness(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"context": "a", "choices": " b"}\n', encoding="utf-8")
    with pytest.raises(CourseError):
        write_harness_task(path, tmp_path / "harness")
    assert not (tmp_path / "harness").exists()


def test_module_imports_without_the_extra(tmp_path):
    "Without lm_eval the module still imports, and using the harness says in one line what to install."
    program = ("import sys; sys.modules['lm_eval'] = None\n"
               "import openllm_edu.lm_eval_bridge as bridge\n"
               "bridge.require_lm_eval()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert "CourseError" in last_line and "pip install 'openllm-edu[eval]'" in last_line

