"""Chapter 10's benchmark tasks: built deterministically from the held-out scenes only, well formed, at chance for a
model that knows nothing and above it for one that has seen the text; `evaluate_task` against a slow loop; the
JSON Lines format, its one-line errors, and the cache. All under the ci profile."""
import hashlib
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

import openllm_edu.tasks as tasks_module
from openllm_edu.core import CourseError
from openllm_edu.data import encode_documents
from openllm_edu.model import CACHE_ENV, GPT, GPTConfig, course_data, course_documents, course_model, train_briefly
from openllm_edu.scoring import loglikelihood
from openllm_edu.tasks import (
    BUILTIN_SPECS,
    BUILTIN_TASKS,
    Task,
    TaskItem,
    build_task,
    builtin_spec,
    builtin_task,
    check_disjoint,
    evaluate_task,
    load_task,
    read_task_file,
    task_fingerprint,
    wilson_interval,
    write_task_file,
)

NAMES = list(BUILTIN_TASKS)


@pytest.fixture(scope="module")
def split():
    return course_documents("ci")


@pytest.fixture(scope="module")
def built(split):
    return {name: build_task(BUILTIN_SPECS[name], *split) for name in NAMES}


@pytest.fixture(scope="module")
def tokenizer():
    return course_model("ci")[1]


@pytest.fixture(scope="module")
def memoriser(split, tokenizer):
    "A one-layer GPT trained for a few seconds on the held-out scenes themselves: it has seen every answer."
    tokens = np.concatenate(list(encode_documents(split[1], tokenizer)))
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=128)
    model = GPT(config)
    train_briefly(model, tokens, steps=300, batch_size=8, block_size=64, lr=5e-3)
    return model


def line_of(item: TaskItem) -> str:
    return (item.context + item.choices[item.gold]).split("\n")[-1]


def home_scene(item: TaskItem, held_out) -> str:
    "The held-out scene that holds the item's context and right answer, as one piece of text."
    homes = [doc for doc in held_out if item.context + item.choices[item.gold] in doc]
    assert homes, f"{item.id} is not text of any held-out scene"
    return homes[0]


# ---- the split and the leak checks

def test_course_documents_is_the_split_course_data_encodes():
    train_docs, held_out = course_documents("ci")
    data = course_data("ci")
    assert np.array_equal(np.concatenate(list(encode_documents(held_out, data.tokenizer))), data.val)
    assert np.array_equal(np.concatenate(list(encode_documents(train_docs, data.tokenizer))), data.train)


def test_held_out_scenes_are_not_training_scenes_by_content_hash(split):
    train_docs, held_out = split
    digest = lambda doc: hashlib.sha256(doc.encode("utf-8")).hexdigest()
    assert held_out and not {digest(d) for d in train_docs} & {digest(d) for d in held_out}
    check_disjoint(*split)
    with pytest.raises(CourseError, match="also training documents"):
        check_disjoint(train_docs, [*held_out, train_docs[3]])
    with pytest.raises(CourseError, match="also training documents"):
        build_task(BUILTIN_SPECS["cloze"], train_docs, [*held_out, train_docs[3]])


@pytest.mark.parametrize("name", NAMES)
def test_no_item_text_occurs_in_a_training_document(name, built, split):
    train_docs, held_out = split
    for item in built[name].items:
        home_scene(item, held_out)
        line = line_of(item)
        assert len(line.encode()) >= 20
        assert not any(line in doc for doc in train_docs), f"{item.id} is about a training line: {line!r}"


def test_a_leaked_line_is_refused(split):
    "Put a held-out scene's lines into training: the builders must skip them, and the final check must hold."
    train_docs, held_out = split
    leaked = held_out[0].split("\n\n", 3)[-1]  # the scene's text after its header, as a new training document
    task = build_task(BUILTIN_SPECS["cloze"], [*train_docs, leaked], held_out)
    assert all(line_of(item) not in leaked for item in task.items)
    item = task.items[0]
    with pytest.raises(CourseError, match=f"item {item.id} is about a line that occurs in the training split"):
        tasks_module.check_leak_free([item], tasks_module.TrainingText([line_of(item)]))


# ---- determinism and the shape of each task

@pytest.mark.parametrize("name", NAMES)
def test_building_is_deterministic_and_the_seed_matters(name, built, split):
    again = build_task(BUILTIN_SPECS[name], *split)
    assert again.items == built[name].items and again.fingerprint == built[name].fingerprint
    # a seed picks which candidates become items, so it shows where there are more candidates than items
    fewer, other = (build_task(builtin_spec(name, seed=seed, max_items=16), *split) for seed in (0, 1))
    assert len(fewer.items) == len(other.items) == 16
    assert other.fingerprint != fewer.fingerprint and other.items != fewer.items
    assert task_fingerprint(name, again.kind, again.items, again.spec) == again.fingerprint
    ids = [item.id for item in again.items]
    assert ids == [f"{name}-{i:04d}" for i in range(len(ids))]


@pytest.mark.parametrize("name", NAMES)
def test_every_item_is_well_formed(name, built):
    task = built[name]
    assert task.kind == BUILTIN_TASKS[name] and len(task.items) >= 20
    for item in task.items:
        assert 0 <= item.gold < len(item.choices) and len(set(item.choices)) == len(item.choices)
        assert all(choice for choice in item.choices)
        assert len(item.choices) == (1 if task.kind == "greedy" else 4)


@pytest.mark.parametrize("name", ["cloze", "speaker"])
def test_each_place_holds_the_answer_equally_often(name, built):
    "So that 'always the first choice' (or the last) scores chance, to within one item."
    items = built[name].items
    counts = [sum(item.gold == place for item in items) for place in range(4)]
    assert max(counts) - min(counts) <= 1, counts


def test_cloze_distractors_come_from_other_scenes_and_match_the_length(built, split):
    held_out = split[1]
    gaps = []
    for item in built["cloze"].items:
        home = home_scene(item, held_out)
        gold = item.choices[item.gold]
        assert item.context.endswith("\n") and 1 <= item.context.count("\n") <= 3
        assert f"{item.context}{gold}\n" in home + "\n"  # the context is the lines just before the answer
        for j, choice in enumerate(item.choices):
            if j != item.gold:
                assert choice not in home.split("\n") and any(choice in doc.split("\n") for doc in held_out)
                gaps.append(abs(len(choice.encode()) - len(gold.encode())))
    assert max(gaps) <= 8 and np.mean(gaps) <= 2  # bytes; measured: mean 0.5, largest 5


def test_speaker_choices_are_the_cast_of_the_play_and_each_is_gold_equally_often(built, split):
    held_out = split[1]
    speakers_of_play = defaultdict(set)  # from the text itself: "NAME:" lines of each play's held-out scenes
    for doc in held_out:
        speakers_of_play[doc.split("\n", 1)[0]] |= {line[:-1] for line in doc.split("\n") if line.endswith(":")}
    answers = defaultdict(list)
    for item in built["speaker"].items:
        play = home_scene(item, held_out).split("\n", 1)[0]
        names = [choice.split(":\n")[0] for choice in item.choices]
        lines = {choice.split(":\n", 1)[1] for choice in item.choices}
        assert len(lines) == 1 and set(names) <= speakers_of_play[play]
        assert item.context.endswith("\n\n")  # home_scene found context + "NAME:\nline": the name is not in the context
        answers[tuple(sorted(names))].append(names[item.gold])
    for cast, golds in answers.items():
        assert len({golds.count(name) for name in cast}) == 1, f"cast {cast} is not balanced: {golds}"


def test_lastword_asks_for_the_last_word_of_a_held_out_line(built, split):
    held_out = split[1]
    for item in built["lastword"].items:
        (word,) = item.choices
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 4
        home = home_scene(item, held_out)
        start = home.index(item.context + word) + len(item.context + word)
        rest = home[start:].split("\n", 1)[0]
        assert not any(c.isalnum() for c in rest)  # only punctuation follows the word on its line


# ---- evaluation

def slow_evaluation(model, tokenizer, task: Task) -> dict:
    "The obvious way: one choice at a time, best choice picked by hand, Wilson's formula written out."
    right = right_per_byte = 0
    for item in task.items:
        scores = [loglikelihood(model, tokenizer, [(item.context, choice)], batch_size=1)[0] for choice in item.choices]
        if task.kind == "greedy":
            right += scores[item.gold].is_greedy
            continue
        logprobs = [s.logprob for s in scores]
        per_byte = [s.logprob / len(choice.encode("utf-8")) for s, choice in zip(scores, item.choices)]
        right += int(np.argmax(logprobs)) == item.gold
        right_per_byte += int(np.argmax(per_byte)) == item.gold
    n = len(task.items)
    z, p = 1.959963984540054, right / n
    centre = (right + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p * (1 - p) + z * z / (4 * n))
    return dict(n=n, accuracy=right / n, accuracy_norm=None if task.kind == "greedy" else right_per_byte / n,
                chance=0.0 if task.kind == "greedy" else sum(1 / len(i.choices) for i in task.items) / n,
                interval=(max(0.0, centre - half), min(1.0, centre + half)))


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_task_equals_the_slow_loop(name, built, memoriser, tokenizer):
    task = built[name]
    result = evaluate_task(memoriser, tokenizer, task, limit=25, batch_size=7)
    first = Task(task.name, task.kind, task.items[:25], "")
    expected = slow_evaluation(memoriser, tokenizer, first)
    assert result.task == name and result.n == expected["n"] == 25
    assert result.accuracy == expected["accuracy"] and result.accuracy_norm == expected["accuracy_norm"]
    assert math.isclose(result.chance, expected["chance"])
    assert np.allclose(result.interval, expected["interval"], atol=1e-12)
    assert json.loads(json.dumps(result.to_dict()))["interval"] == list(result.interval)


def test_a_random_model_scores_chance_on_every_task(built, tokenizer):
    torch.manual_seed(0)
    model = GPT(course_model("ci")[0].config).eval()
    for name, task in built.items():
        result = evaluate_task(model, tokenizer, task)
        assert result.n == len(task.items)
        assert result.interval[0] <= task.chance <= result.interval[1], f"random init is off chance on {name}: {result}"


def test_a_model_that_has_seen_the_text_beats_chance(built, memoriser, tokenizer):
    # Measured once (ci): cloze 0.90, speaker 0.96, lastword 0.44. The bars are well below.
    bars = {"cloze": 0.6, "speaker": 0.6, "lastword": 0.2}
    for name, task in built.items():
        result = evaluate_task(memoriser, tokenizer, task)
        assert result.interval[0] > task.chance and result.accuracy >= bars[name], f"{name}: {result}"


def test_chance_and_wilson_interval_against_hand_computed_values():
    items = (TaskItem("a", ("b", "c"), 0, "x-0"), TaskItem("a", ("b", "c", "d", "e"), 3, "x-1"))
    assert Task("x", "choice", items, "").chance == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert Task("x", "greedy", items, "").chance == 0
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    z2 = 1.959963984540054**2  # at 0 of n the upper end is z²/(n + z²); at n of n the lower end is n/(n + z²)
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_evaluate_task_refuses_a_bad_limit(built, memoriser, tokenizer):
    with pytest.raises(CourseError, match="limit"):
        evaluate_task(memoriser, tokenizer, built["cloze"], limit=0)


# ---- the file format

@pytest.mark.parametrize("name", NAMES)
def test_a_built_task_survives_a_round_trip(name, built, tmp_path):
    path = write_task_file(built[name], tmp_path / f"{name}.jsonl")
    back = read_task_file(path)
    assert back == built[name] and back.spec == built[name].spec and back.fingerprint == built[name].fingerprint


def test_a_user_file_without_header(tmp_path):
    path = tmp_path / "quiz.jsonl"
    rows = [{"context": "Ça va? ", "choices": ["oui 🙂", "non"], "gold": 1},
            {"context": "x", "choices": ["a", "b", "c"], "gold": 2, "id": "mine"}]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n", encoding="utf-8")
    task = read_task_file(path)
    assert (task.name, task.kind, task.spec) == ("quiz", "choice", None)
    assert task.items == (TaskItem("Ça va? ", ("oui 🙂", "non"), 1, "quiz-0000"), TaskItem("x", ("a", "b", "c"), 2, "mine"))
    assert task.chance == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert read_task_file(write_task_file(task, tmp_path / "copy.jsonl")) == task
    greedy = tmp_path / "squad.jsonl"
    greedy.write_text('{"context": "Q: Who wrote Hamlet?\\nA:", "choices": [" Shakespeare"], "gold": 0}\n')
    assert read_task_file(greedy).kind == "greedy" and read_task_file(greedy).chance == 0


GOOD = '{"context": "a", "choices": ["b", "c"], "gold": 0}'
MALFORMED = {
    "bad JSON": (f'{GOOD}\n{{"context": "a", "choices": ["b"] "gold": 0}}\n', 2, "not valid JSON"),
    "missing key": (f'{GOOD}\n\n{{"context": "a", "choices": ["b", "c"]}}\n', 3, "has no 'gold'"),
    "gold out of range": (f'{GOOD}\n{{"context": "a", "choices": ["b", "c"], "gold": 2}}\n', 2, "out of range"),
    "negative gold": ('{"context": "a", "choices": ["b", "c"], "gold": -1}\n', 1, "out of range"),
    "gold a bool": ('{"context": "a", "choices": ["b", "c"], "gold": true}\n', 1, "out of range"),
    "empty choices": (f'{GOOD}\n{{"context": "a", "choices": [], "gold": 0}}\n', 2, "non-empty list"),
    "an empty choice": (f'{GOOD}\n{{"context": "a", "choices": ["b", ""], "gold": 0}}\n', 2, "non-empty strings"),
    "repeated choices": (f'{GOOD}\n{{"context": "a", "choices": ["b", "b"], "gold": 0}}\n', 2, "repeat"),
    "not an object": (f'{GOOD}\n[1, 2]\n', 2, "expected an object"),
    "unknown key": (f'{GOOD}\n{{"context": "a", "choices": ["b", "c"], "gold": 0, "answer": 1}}\n', 2, "'answer'"),
    "context not text": (f'{GOOD}\n{{"context": 3, "choices": ["b", "c"], "gold": 0}}\n', 2, "must be strings"),
    "one choice in a choice task": (f'{GOOD}\n{{"context": "a", "choices": ["b"], "gold": 0}}\n', 2, "two choices"),
    "bad header kind": ('{"task": "t", "kind": "essay"}\n' + GOOD + "\n", 1, "kind"),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_file_gets_one_line_naming_the_line(what, tmp_path):
    text, line, words = MALFORMED[what]
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CourseError) as error:
        read_task_file(path)
    message = str(error.value)
    assert "\n" not in message and f"{path} line {line}" in message and words in message, message


def test_non_utf8_and_empty_and_missing_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"context": "caf\xe9", "choices": ["b", "c"], "gold": 0}\n')
    with pytest.raises(CourseError, match=r"line 2 is not UTF-8 text; save the file as UTF-8\.$"):
        read_task_file(path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CourseError, match="holds no items"):
        read_task_file(tmp_path / "empty.jsonl")
    with pytest.raises(CourseError, match="cannot read the task file"):
        read_task_file(tmp_path / "nowhere.jsonl")


def test_an_edited_copy_of_a_built_task_is_refused(built, tmp_path):
    path = write_task_file(built["cloze"], tmp_path / "cloze.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    row = json.loads(lines[5])
    lines[5] = json.dumps({**row, "gold": (row["gold"] + 1) % 4}) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CourseError, match="line 1: the fingerprint does not match"):
        read_task_file(path)


def test_writing_is_atomic(built, tmp_path):
    path = write_task_file(built["speaker"], tmp_path / "task.jsonl")
    before = path.read_bytes()
    broken = Task("broken", "choice", (TaskItem(object(), ("a", "b"), 0, "x"),), "")  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_task_file(broken, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["task.jsonl"]


# ---- the cache

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / "tasks"


def test_the_cached_file_is_reused(cache, built, monkeypatch):
    first = builtin_task("speaker", "ci")
    (path,) = cache.glob("speaker-ci-*.jsonl")
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(tasks_module, "build_task", lambda *a, **k: pytest.fail("a cached task was built again"))
    again = builtin_task("speaker", "ci")
    assert again == first and again.items == built["speaker"].items and path.stat().st_mtime_ns == stamp
    assert load_task("speaker", "ci") == first and load_task(str(path)) == first


@pytest.mark.parametrize("damage", ["cut", "garbage", "another spec"])
def test_a_damaged_cache_is_rebuilt(damage, cache, capsys):
    first = builtin_task("lastword", "ci")
    (path,) = cache.glob("lastword-ci-*.jsonl")
    if damage == "cut":
        path.write_bytes(path.read_bytes()[:-30])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not a task")
    else:  # a well-formed task file of another seed, under this spec's name
        other = builtin_task("lastword", "ci", seed=7, max_items=50)
        path.write_bytes(next(p for p in cache.glob("lastword-ci-*.jsonl") if p != path).read_bytes())
        assert other.items != first.items
    capsys.readouterr()
    rebuilt = builtin_task("lastword", "ci")
    assert rebuilt == first and read_task_file(path) == first
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "is damaged" in message and "building it again" in message


def test_a_changed_spec_is_built_into_its_own_file(cache):
    default = builtin_task("cloze", "ci")
    fewer = builtin_task("cloze", "ci", max_items=10)
    assert len(fewer.items) == 10 and fewer.fingerprint != default.fingerprint
    assert len(list(cache.glob("cloze-ci-*.jsonl"))) == 2


def test_bad_names_and_specs_are_refused(tmp_path):
    with pytest.raises(CourseError, match="unknown built-in task 'hellaswag'"):
        builtin_task("hellaswag", "ci")
    with pytest.raises(CourseError, match="unknown task spec field"):
        builtin_spec("cloze", seeds=1)
    with pytest.raises(CourseError, match="n_choices must be a whole number of at least 2"):
        builtin_spec("cloze", n_choices=1)
    with pytest.raises(CourseError, match="unknown task 'hellaswag'; give one of cloze, speaker, lastword"):
        load_task("hellaswag")


def test_evaluate_task_refuses_an_empty_task(memoriser, tokenizer):
    with pytest.raises(CourseError, match="has no items"):
        evaluate_task(memoriser, tokenizer, Task("nothing", "choice", (), ""))
