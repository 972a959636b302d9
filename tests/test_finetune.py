"""Chapter 11 part 2: instruction data from the plays (seeded, held-out items disjoint from training text by line
hash), the conversation JSON-lines format and Alpaca records, the conversation sampler (masked targets checked
against render_conversation's mask, reproducible and resumable), and a short fine-tuning run of the course model
that must beat the base model's exact match and learn to end its turn."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from openllm_edu.chat import ChatTokenizer, render_conversation, resize_embeddings
from openllm_edu.core import CourseError
from openllm_edu.finetune import (
    FAMILIES,
    UNANSWERABLE,
    ConversationSampler,
    alpaca_to_messages,
    best_constant,
    exact_match,
    finetune_conversations,
    fits_block,
    instruction_data,
    read_conversations,
    sft_trainer,
    squad_instruction_data,
    write_conversations,
)
from openllm_edu.model import IGNORE_INDEX, course_documents, course_model
from openllm_edu.sources import load_squad_rows
from openllm_edu.tasks import SPEAKER_LINE
from openllm_edu.train_config import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures" / "data"

LINES = 1  # the ci profile's course model sees 64 tokens
BAR = 0.5  # measured under ci (600 steps, 1 thread): count 0 % -> 100 % (9 items), play 0 % -> 30 % (30), the rest 0 %
ROOM = 48  # new tokens a reply may take: a next line of the ci BPE can take 30


@pytest.fixture(scope="module")
def data():
    return instruction_data(seed=0, lines=LINES)


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer(course_model()[1])


def sha(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def test_held_out_items_share_no_line_with_training_text(data):
    train_docs, held_docs = course_documents()
    training = {sha(line) for doc in train_docs for line in doc.split("\n")}
    held = {sha(line) for doc in held_docs for line in doc.split("\n")}
    for family, items in data["held_out"].items():
        assert items, family
        for messages in items:
            question, answer = messages[0]["content"], messages[1]["content"]
            shown = [line for line in question.split("\n")[1:] if not SPEAKER_LINE.fullmatch(line)]
            if family == "next_line":
                shown.append(answer)
            assert shown and all(sha(line) not in training and sha(line) in held for line in shown), messages


def test_training_items_come_from_training_text(data):
    train_docs = course_documents()[0]
    training = {sha(line) for doc in train_docs for line in doc.split("\n")}
    for messages in data["train"]:
        assert all(sha(line) in training for line in messages[0]["content"].split("\n")[1:])


def test_answers_are_checkable(data):
    assert all(data["held_out"][family] for family in FAMILIES), {f: len(items) for f, items in data["held_out"].items()}
    for family, items in data["held_out"].items():
        for messages in items:
            question, answer = messages[0]["content"], messages[1]["content"]
            if family == "count":
                name = question.split(" speak ")[0].removeprefix("How many lines does ")
                lines, speaker = 0, None
                for line in question.split("\n")[1:]:  # the slow way: walk the passage, count NAME's lines
                    if SPEAKER_LINE.fullmatch(line):
                        speaker = line[:-1]
                    else:
                        lines += speaker == name
                assert answer == str(lines)
            elif family == "speaker":
                assert f"\n{answer}:\n" in "\n".join(course_documents()[1])
            elif family == "reply":
                name = question.split(" in this passage?")[0].removeprefix("Who speaks after ")
                speakers = [line[:-1] for line in question.split("\n")[1:] if SPEAKER_LINE.fullmatch(line)]
                assert len(speakers) == 3 and speakers.count(name) == 1  # the slow way: the next NAME: line
                assert answer == speakers[speakers.index(name) + 1]
            elif family == "first":
                speakers = [line[:-1] for line in question.split("\n")[1:] if SPEAKER_LINE.fullmatch(line)]
                assert len(speakers) == 2 and answer == speakers[0] != speakers[1]


def test_instruction_data_is_deterministic_and_seeded(data):
    assert instruction_data(seed=0, lines=LINES) == data
    assert instruction_data(seed=1, lines=LINES)["train"] != data["train"]
    assert instruction_data(families=["count"], n_per_family=5, lines=LINES)["held_out"].keys() == {"count"}


@pytest.mark.parametrize("bad", [dict(families=["poetry"]), dict(families=[]), dict(n_per_family=0),
                                 dict(lines=0)])
def test_instruction_data_refuses_bad_arguments(bad):
    with pytest.raises(CourseError):
        instruction_data(**bad)


def test_jsonl_round_trip_and_bad_lines(tmp_path, data):
    path = write_conversations(data["train"][:7], tmp_path / "mine.jsonl")
    assert [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()] == data["train"][:7]
    assert read_conversations(path) == data["train"][:7]
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    for bad in ['{"messages": [{"role": "user", "content": 3}]}', '["not", "an", "object"]', "{not json",
                '{"messages": []}']:
        path.write_text(f"{good}\n\n{good}\n{bad}\n", encoding="utf-8")
        with pytest.raises(CourseError, match="line 4"):
            read_conversations(path)
    with pytest.raises(CourseError, match="no conversation file"):
        read_conversations(tmp_path / "missing.jsonl")


def test_alpaca_records_become_conversations():
    record = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert alpaca_to_messages(record) == [{"role": "user", "content": "Translate.\n\nBonjour"},
                                          {"role": "assistant", "content": "Hello"}]
    assert alpaca_to_messages({"instruction": "Hi.", "input": "", "output": "Hello"})[0]["content"] == "Hi."
    for bad in [{"instruction": "x"}, {"instruction": "x", "output": 1}, {"instruction": "x", "output": "y", "input": 2}]:
        with pytest.raises(CourseError):
            alpaca_to_messages(bad)


def test_squad_rows_become_question_answering_conversations():
    "The fixture's SQuAD questions, graded on paragraphs the training side never shows (split by paragraph hash)."
    rows = load_squad_rows(data_files=FIXTURES / "squad_sample.jsonl") + [
        {"context": "A paragraph SQuAD 2.0 cannot answer from.", "question": "Who wrote it?", "answers": []}]
    items = squad_instruction_data(rows, every=5)
    conversations = items["train"] + items["held_out"]["squad"]
    expected = {(f"Answer from the passage.\n{r['context']}\nQuestion: {r['question']}",
                 r["answers"][0] if r["answers"] else UNANSWERABLE) for r in rows}
    assert {(m[0]["content"], m[1]["content"]) for m in conversations} == expected
    assert len(conversations) == len(rows) and items["train"] and items["held_out"]["squad"]
    paragraph = lambda messages: messages[0]["content"].split("\n")[1]
    assert not {paragraph(m) for m in items["train"]} & {paragraph(m) for m in items["held_out"]["squad"]}
    with pytest.raises(CourseError, match="give more paragraphs"):  # one paragraph cannot be on both sides
        squad_instruction_data(rows[:1], every=5)
    from_file = squad_instruction_data(rows[:-1])  # the command line's --data squad:FILE
    assert finetune_conversations(f"squad:{FIXTURES / 'squad_sample.jsonl'}", None, 1) == (
        from_file["train"], from_file["held_out"])


def test_best_constant_is_the_most_common_answer_share():
    items = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": a}] for a in ["1", "2", " 1", "1", "3"]]
    assert best_constant(items) == 3 / 5 and best_constant([]) == 0.0


def test_sampler_targets_are_the_masked_ids(data, chat):
    items = fits_block(data["train"], chat, 64)
    sampler = ConversationSampler(items, chat, batch_size=6, block_size=64, seed=3)
    rendered = {tuple(render_conversation(chat, messages)[0]): render_conversation(chat, messages)[1] for messages in items}
    x, y = sampler.batch(0)
    assert x.shape == y.shape == (6, 64)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        length = next(i for i in range(64, 0, -1) if row_y[i - 1] != IGNORE_INDEX)  # the last target closes the text
        ids = row_x[:length] + [row_y[length - 1]]
        mask = rendered[tuple(ids)]  # the row is one whole conversation
        expected = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], mask[1:])]
        assert row_y == expected + [IGNORE_INDEX] * (64 - length)
        assert row_x[length:] == [chat.pad_id] * (64 - length)


def test_sampler_is_reproducible_and_resumes(data, chat):
    items = fits_block(data["train"], chat, 64)
    first = ConversationSampler(items, chat, batch_size=4, block_size=64, seed=7)
    batches = [next(first) for _ in range(5)]
    state = ConversationSampler(items, chat, batch_size=4, block_size=64, seed=7, step=2).state_dict()
    resumed = ConversationSampler(items, chat, batch_size=4, block_size=64, seed=0)
    resumed.load_state_dict(state)
    for batch, again in zip(batches[2:], [next(resumed) for _ in range(3)]):
        assert torch.equal(batch[0], again[0]) and torch.equal(batch[1], again[1])
    assert not torch.equal(batches[0][0], batches[1][0])
    with pytest.raises(CourseError, match="batch_size"):
        ConversationSampler(items, chat, batch_size=5, block_size=64).load_state_dict(state)


def test_sampler_refuses_a_conversation_longer_than_the_block(chat):
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(CourseError, match="conversation 1"):
        ConversationSampler([[{"role": "user", "content": "hi"}], long], chat, batch_size=2, block_size=64)
    assert fits_block([long], chat, 64) == []


def test_sft_trainer_refuses_a_model_without_chat_ids(data, chat, tmp_path):
    model = course_model()[0]
    config = TrainConfig(out_dir=str(tmp_path), block_size=64, batch_size=4, max_steps=2, eval_every=0, device="cpu")
    with pytest.raises(CourseError, match="resize_embeddings"):
        sft_trainer(model, chat, data["train"][:4], config)
    with pytest.raises(CourseError, match="eval_every"):
        sft_trainer(resize_embeddings(model, chat.vocab_size), chat, data["train"][:4], config.replace(eval_every=5))


def test_fine_tuning_beats_the_base_model_and_ends_its_turns(data, chat, tmp_path):
    model = resize_embeddings(course_model()[0], chat.vocab_size)
    held_out = {family: fits_block(items, chat, 64) for family, items in data["held_out"].items()}
    before = exact_match(model, chat, held_out, limit=30, max_new_tokens=ROOM)
    config = TrainConfig(out_dir=str(tmp_path), block_size=64, batch_size=8, max_steps=600, eval_every=0, seed=0,
                         schedule=dict(max_lr=2e-3, min_lr=2e-4, warmup_steps=20), progress=False, tensorboard=False,
                         precision="fp32", device="cpu", log_every=50)
    sft_trainer(model, chat, fits_block(data["train"], chat, 64), config).fit()
    after = exact_match(model, chat, held_out, limit=30, max_new_tokens=ROOM)
    gains = {family: after[family]["exact_match"] - before[family]["exact_match"] for family in held_out}
    assert max(gains.values()) >= BAR, (before, after)
    ended = sum(r["ended"] * r["n"] for r in after.values()) / sum(r["n"] for r in after.values())
    assert ended >= 0.9 and all(r["ended"] == 0 for r in before.values()), (before, after)  # measured: 0 % -> 98 %
