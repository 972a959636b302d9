"""openllm_edu.compare (chapter 10, part 3): generation quality against slow obvious counts and chapter 06's own
`generate_text`; the run comparison against run folders whose numbers are written by hand, and a real Trainer run."""
import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from openllm_edu.compare import (
    QUALITY_PROMPTS,
    Generation,
    GenerationQuality,
    compare_runs,
    distinct_n,
    format_comparison,
    generate_samples,
    generation_quality,
    ngrams,
    plot_runs,
    quality_table,
    read_run,
    repetition_rate,
    self_perplexity,
)
from openllm_edu.core import CourseError
from openllm_edu.generate import GenerationConfig, generate_text
from openllm_edu.model import GPT, GPTConfig, course_model

# --- n-gram counts, against the obvious slow versions --------------------------------------------------------


def slow_distinct(sequences, n):
    counts = Counter()
    for seq in sequences:
        for i in range(len(seq) - n + 1):
            counts[tuple(seq[i:i + n])] += 1
    return len(counts) / sum(counts.values()) if counts else math.nan


def slow_repetition(sequences, n):
    repeats = total = 0
    for seq in sequences:
        seen = []
        for i in range(len(seq) - n + 1):
            gram = list(seq[i:i + n])
            repeats += gram in seen
            total += 1
            seen.append(gram)
    return repeats / total if total else math.nan


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), max_size=12), max_size=5), st.integers(1, 4))
def test_distinct_and_repetition_equal_the_slow_counts(sequences, n):
    assert same(distinct_n(sequences, n), slow_distinct(sequences, n))
    assert same(repetition_rate(sequences, n), slow_repetition(sequences, n))


def test_counts_by_hand():
    assert ngrams("abcd", 3) == [("a", "b", "c"), ("b", "c", "d")] and ngrams("ab", 3) == []
    words = [["the", "cat", "sat"], ["the", "cat", "ran"]]
    assert distinct_n(words, 1) == 4 / 6 and distinct_n(words, 2) == 3 / 4
    assert distinct_n([[1, 2], [2, 1]], 2) == 1.0  # (2, 2) would span two samples
    # the pairs of a a a a b: (a, a) three times, then (a, b); the second and third (a, a) are repeats
    assert repetition_rate([list("aaaab")], 2) == 2 / 4
    assert repetition_rate([list("ab"), list("ab")], 2) == 0.0, "a repeat across samples is not a loop"
    assert math.isnan(distinct_n([[]], 1)) and math.isnan(repetition_rate([[1, 2]], 4))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CourseError, match="n-gram"):
            distinct_n([[1]], bad)


# --- samples -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def course():
    return course_model("ci")


def test_samples_are_chapter_06s_text_for_the_same_seeds(course):
    model, tokenizer = course
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, seed=5)
    samples = generate_samples(model, tokenizer, ["ROMEO:\n", ""], config, samples_per_prompt=2)
    expected = [generate_text(model, tokenizer, prompt, dataclasses.replace(config, seed=5 + k))
                for k, prompt in enumerate(["ROMEO:\n", "ROMEO:\n", "", ""])]
    assert [s.text for s in samples] == expected
    assert [s.prompt for s in samples] == ["ROMEO:\n", "ROMEO:\n", "", ""]
    assert samples == generate_samples(model, tokenizer, ["ROMEO:\n", ""], config, samples_per_prompt=2)
    assert all(tokenizer.decode(list(s.token_ids)) == s.text and len(s.token_ids) <= 12 for s in samples)
    assert model.training is False


def eos_model(tokenizer, eos_logit: float) -> GPT:
    "A GPT whose next-token logits are 0 everywhere but at the end-of-text id, where they are `eos_logit`."
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32, tie_embeddings=False))
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_id, 0] = eos_logit
    return model.eval()


def test_eos_fraction_and_length(course):
    _, tokenizer = course
    config = GenerationConfig(max_new_tokens=7, temperature=1.0, seed=0)
    stops = generate_samples(eos_model(tokenizer, 50.0), tokenizer, QUALITY_PROMPTS[:3], config)
    assert all(s.ended_at_eos and s.token_ids == () and s.text == "" for s in stops)
    never = generate_samples(eos_model(tokenizer, -50.0), tokenizer, QUALITY_PROMPTS[:3], config)
    assert not any(s.ended_at_eos for s in never) and all(len(s.token_ids) == 7 for s in never)
    quality = generation_quality(stops + never)
    assert quality.eos_fraction == 0.5 and quality.mean_tokens == 3.5 and quality.samples == 6
    ignoring = generate_samples(eos_model(tokenizer, 50.0), tokenizer, ["x"], dataclasses.replace(config, stop_at_eos=False))
    assert ignoring[0].token_ids == (tokenizer.eos_id,) * 7 and not ignoring[0].ended_at_eos


def test_generation_quality_is_the_counts_of_its_samples():
    samples = [Generation("p", "to be or not to be", (1, 2, 3, 1, 2, 3, 1, 2), False),
               Generation("q", "be be", (1, 2), True)]
    quality = generation_quality(samples)
    tokens, words = [s.token_ids for s in samples], [s.text.split() for s in samples]
    assert quality.distinct_1_tokens == slow_distinct(tokens, 1) == 3 / 10
    assert quality.distinct_2_tokens == slow_distinct(tokens, 2) == 3 / 8
    assert quality.distinct_1_words == slow_distinct(words, 1) == 4 / 8
    assert quality.distinct_2_words == slow_distinct(words, 2) == 5 / 6
    assert quality.repeated_4grams == slow_repetition(tokens, 4) == 2 / 5
    assert (quality.mean_tokens, quality.eos_fraction) == (5.0, 0.5)
    assert json.loads(json.dumps(quality.to_dict()))["samples"] == 2


def test_greedy_loops_more_than_sampling(course):
    model, tokenizer = course
    greedy = generation_quality(generate_samples(model, tokenizer, QUALITY_PROMPTS, GenerationConfig(40, temperature=0)))
    sampled = generation_quality(generate_samples(model, tokenizer, QUALITY_PROMPTS, GenerationConfig(40, seed=0)))
    assert greedy.repeated_4grams > sampled.repeated_4grams
    assert greedy.distinct_2_tokens < sampled.distinct_2_tokens


def test_samples_bad_input(course):
    model, tokenizer = course
    with pytest.raises(CourseError, match="reproducible"):
        generate_samples(model, tokenizer, ["a"], GenerationConfig(5))
    with pytest.raises(CourseError, match="stop_strings"):
        generate_samples(model, tokenizer, ["a"], GenerationConfig(5, seed=0, stop_strings=("\n",)))
    with pytest.raises(CourseError, match="samples_per_prompt"):
        generate_samples(model, tokenizer, ["a"], GenerationConfig(5, seed=0), samples_per_prompt=0)
    with pytest.raises(CourseError, match="no samples"):
        generation_quality([])


# --- self-perplexity: the samples under the model that wrote them --------------------------------------------

def slow_self_perplexity(model, samples):
    "Each generated token by its own forward pass over the last block_size ids before it: what generation read."
    block, nll, count = model.config.block_size, 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = [*sample.prompt_ids, *sample.token_ids]
            for j in range(len(sample.prompt_ids), len(ids)):
                logits, _ = model(torch.tensor([ids[max(0, j - block):j]]))
                nll += F.cross_entropy(logits[0, -1:].double(), torch.tensor([ids[j]])).item()
                count += 1
    return math.exp(nll / count)


def test_self_perplexity_equals_cross_entropy_of_each_sample(course):
    model, tokenizer = course
    samples = generate_samples(model, tokenizer, QUALITY_PROMPTS[:4], GenerationConfig(16, seed=2), samples_per_prompt=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:  # short samples: one forward of prompt + sample, PyTorch's cross-entropy on the tail
            ids, n = torch.tensor([sample.prompt_ids + sample.token_ids]), len(sample.token_ids)
            logits, _ = model(ids[:, :-1])
            nll += F.cross_entropy(logits[0, -n:].double(), ids[0, -n:], reduction="sum").item()
            count += n
    assert self_perplexity(model, samples, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)
    quality = generation_quality(samples, model)
    assert quality.self_perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert math.isnan(generation_quality(samples).self_perplexity), "no model, no self-perplexity"


def test_samples_longer_than_the_context_are_read_as_generation_read_them(course):
    model, tokenizer = course
    long = model.config.block_size + 20
    samples = generate_samples(model, tokenizer, ["ROMEO:\n", ""], GenerationConfig(long, seed=4, stop_at_eos=False))
    assert all(len(s.prompt_ids) + len(s.token_ids) > model.config.block_size + 1 for s in samples)
    assert self_perplexity(model, samples) == pytest.approx(slow_self_perplexity(model, samples), rel=1e-5)


def test_greedy_samples_have_a_lower_self_perplexity(course):
    model, tokenizer = course
    greedy = generate_samples(model, tokenizer, QUALITY_PROMPTS, GenerationConfig(40, temperature=0))
    sampled = generate_samples(model, tokenizer, QUALITY_PROMPTS, GenerationConfig(40, temperature=1.0, seed=0))
    assert self_perplexity(model, greedy) < self_perplexity(model, sampled)


def constant_model(tokenizer, logits: torch.Tensor) -> GPT:
    "A GPT whose next-token logits are `logits` after every context: its probabilities are known by hand."
    model = eos_model(tokenizer, 0.0)
    with torch.no_grad():
        model.lm_head.weight[:, 0] = logits
    return model


def test_self_perplexity_by_hand_on_a_model_that_ignores_its_context(course):
    _, tokenizer = course
    torch.manual_seed(1)
    logits = torch.randn(tokenizer.vocab_size, dtype=torch.float64)
    logits[tokenizer.eos_id] = -30.0  # samples run to max_new_tokens
    model = constant_model(tokenizer, logits.float())
    log_p = torch.log_softmax(logits.float().double(), dim=0)
    greedy = generate_samples(model, tokenizer, ["a", "b"], GenerationConfig(9, temperature=0))
    # greedy takes the most likely id every time: each token has probability max p, perplexity 1 / max p
    assert self_perplexity(model, greedy) == pytest.approx(math.exp(-log_p.max().item()), rel=1e-5)
    sampled = generate_samples(model, tokenizer, ["a", "b"], GenerationConfig(9, temperature=0.5, seed=3))
    ids = [t for s in sampled for t in s.token_ids]
    by_hand = math.exp(-sum(log_p[t].item() for t in ids) / len(ids))  # at temperature 1, whatever wrote them
    assert self_perplexity(model, sampled) == pytest.approx(by_hand, rel=1e-5)


def test_empty_samples_count_for_nothing(course):
    model, tokenizer = course
    stops = generate_samples(eos_model(tokenizer, 50.0), tokenizer, ["x", "y"], GenerationConfig(5, seed=0))
    assert all(s.token_ids == () for s in stops)
    assert math.isnan(self_perplexity(model, stops))
    quality = generation_quality(stops, model)
    assert math.isnan(quality.self_perplexity) and "—" in quality_table({"stops": quality}).splitlines()[1]
    written = generate_samples(model, tokenizer, ["x"], GenerationConfig(6, seed=0))
    assert self_perplexity(model, stops + written) == self_perplexity(model, written)
    with pytest.raises(CourseError, match="prompt's token ids"):
        self_perplexity(model, [Generation("p", "ab", (1, 2), False)])
    with pytest.raises(CourseError, match="batch_size"):
        self_perplexity(model, written, batch_size=0)
    assert math.isnan(GenerationQuality(1, *[0.0] * 7).self_perplexity)


# --- comparing runs ------------------------------------------------------------------------------------------

def write_run(folder, rows, config=None, report=None, world_size=None, summary=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if world_size is not None:
        (folder / "checkpoints").mkdir()
        torch.save({"world_size": world_size, "model": {"w": torch.zeros(3)}},
                   folder / "checkpoints" / f"step_{rows[-1]['step']:08d}.pt")
    return folder


ROWS_A = [{"step": 1, "train/loss": 5.0}, {"step": 2, "train/loss": 4.0},
          {"step": 2, "val/loss": 3.0, "val/bits_per_byte": 2.0, "eval/cloze/accuracy": 0.3, "eval/cloze/chance": 0.25},
          {"step": 4, "train/loss": 3.5},
          {"step": 4, "val/loss": 3.2, "val/bits_per_byte": 2.1, "eval/cloze/accuracy": 0.2, "eval/cloze/chance": 0.25}]
ROWS_B = [{"step": 3, "train/loss": 4.5}, {"step": 3, "val/loss": 2.9, "val/bits_per_byte": 1.9},
          {"step": 6, "val/loss": 2.7, "val/bits_per_byte": 1.8}]
SIZES = {"grad_accum": 2, "batch_size": 4, "block_size": 16}


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "a", ROWS_A, SIZES, report={"results": [{"task": "cloze", "accuracy": 0.4}]})
    b = write_run(tmp_path / "b", ROWS_B, {**SIZES, "grad_accum": 1}, world_size=2, summary={"steps": 6})
    return a, b


def test_table_by_hand(two_runs):
    comparison = compare_runs(two_runs)
    a, b = comparison.summaries
    assert a["final"] == {"val/loss": 3.2, "val/bits_per_byte": 2.1, "eval/cloze/accuracy": 0.2}
    assert a["best"] == {"val/loss": 3.0, "val/bits_per_byte": 2.0, "eval/cloze/accuracy": 0.3}  # accuracy: highest
    assert (a["steps"], a["tokens"], a["report"]) == (4, 4 * 2 * 4 * 16, {"cloze": 0.4})
    # b ran on 2 processes (its checkpoint says so): a step is 1 x 4 x 16 tokens on each
    assert (b["steps"], b["tokens"]) == (6, 6 * 4 * 16 * 2)
    assert b["final"]["eval/cloze/accuracy"] is None and b["best"]["val/loss"] == 2.7
    assert comparison.runs[1].summary == {"steps": 6}
    table = str(comparison)
    assert "3.2000 / 3.0000" in table and "0.2000 / 0.3000" in table and "768" in table and "0.4000" in table
    assert json.loads(json.dumps(comparison.to_dict())) == {"x": "tokens", "runs": comparison.summaries}


def test_figure_holds_the_logged_values(two_runs, tmp_path):
    comparison = compare_runs(two_runs, x="tokens", path=tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss, bits, accuracy = comparison.figure.axes
    curves = {(line.get_label(), tuple(line.get_xdata())): tuple(line.get_ydata()) for line in loss.lines}
    assert curves[("a", (256, 512))] == (3.0, 3.2) and curves[("b", (384, 768))] == (2.9, 2.7)
    assert [tuple(line.get_ydata()) for line in bits.lines if line.get_label() == "a"] == [(2.0, 2.1)]
    assert any(tuple(line.get_ydata()) == (0.3, 0.2) for line in accuracy.lines)
    assert any(set(line.get_ydata()) == {0.25} for line in accuracy.lines), "the chance level is drawn"
    by_step = plot_runs([read_run(two_runs[0])], x="step")
    assert [tuple(line.get_xdata()) for line in by_step.axes[1].lines] == [(2, 4)]


def test_a_real_run_folder(tmp_path):
    from openllm_edu.bench import synthetic_train_data
    from openllm_edu.loggers import read_metrics
    from openllm_edu.train_config import TrainConfig
    from openllm_edu.trainer import Trainer

    config = TrainConfig.from_dict(dict(out_dir=str(tmp_path / "run"), model="tiny", block_size=16, batch_size=2,
                                        grad_accum=2, max_steps=6, eval_every=3, eval_tokens=64, log_every=1,
                                        model_overrides=dict(n_layer=1, n_head=2, n_embd=16), precision="fp32",
                                        progress=False, tensorboard=False))
    Trainer.from_config(config, data=synthetic_train_data(64, tokens=4096)).fit()
    [summary] = compare_runs([tmp_path / "run"]).summaries
    val = [row["val/loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in row]
    assert (summary["steps"], summary["tokens"]) == (6, 6 * 2 * 2 * 16)
    assert summary["final"]["val/loss"] == val[-1] and summary["best"]["val/loss"] == min(val)


def test_bad_run_folders_are_one_line(two_runs, tmp_path):
    a, _ = two_runs
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "nothing-logged", [{"step": 1}])
    (tmp_path / "nothing-logged" / "metrics.jsonl").write_text("\n")
    torn = write_run(tmp_path / "torn", ROWS_B, SIZES)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "val/lo\n')
    broken = write_run(tmp_path / "broken-config", ROWS_B, SIZES)
    (broken / "config.json").write_text("{not json")
    cases = {tmp_path / "missing": "not a folder", tmp_path / "empty": "no metrics.jsonl",
             tmp_path / "nothing-logged": "no metrics yet", torn: "line 4 is damaged",
             broken: "damaged"}
    for folder, words in cases.items():
        with pytest.raises(CourseError, match=words) as error:
            compare_runs([a, folder])
        assert "\n" not in str(error.value)
    no_config = write_run(tmp_path / "no-config", ROWS_B)
    with pytest.raises(CourseError, match="x='step'"):
        compare_runs([a, no_config])
    assert compare_runs([a, no_config], x="step").summaries[1]["tokens"] is None
    with pytest.raises(CourseError, match="'tokens'"):
        compare_runs([a], x="time")
    with pytest.raises(CourseError, match="list of run folders"):
        compare_runs(str(a))


def test_runs_with_the_same_folder_name_keep_apart(tmp_path):
    one = write_run(tmp_path / "x" / "run", ROWS_B, SIZES)
    two = write_run(tmp_path / "y" / "run", ROWS_B, SIZES)
    names = [s["run"] for s in compare_runs([one, two]).summaries]
    assert names == [str(one), str(two)]
    assert format_comparison(compare_runs([one]).summaries).splitlines()[1].startswith("run ")
