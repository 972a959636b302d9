"""Behaviour of openllm_edu.tokenizer (chapter 02) and openllm_edu.fast_bpe (deep dive 02b): every tokenizer
round-trips any Unicode text, the fast BPE trainer and encoder agree exactly with the obvious reference versions, and bad input is a CourseError that says what to do."""
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openllm_edu.core import CourseError
from openllm_edu.data import hash_split, shakespeare_documents, take_bytes
from openllm_edu.fast_bpe import (
    FAST_TOKENIZER_KINDS,
    FastBPETokenizer,
    PairHeap,
    bench_bpe_training,
    encode_chunk,
    format_tokenizer_bench,
    time_tokenizer_training,
    train_bpe_incremental,
    train_tokenizer,
)
from openllm_edu.sources import FORTUNE_PACKAGES, FORTUNES_DIR, load_corpus
from openllm_edu.tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    bpe_decode,
    bpe_encode,
    get_stats,
    load_tokenizer,
    make_tokenizer,
    merge,
    most_frequent_pair,
    split_text,
    train_bpe_naive,
)

TRICKY = ["\u2581", " ", "  ", "\n", "\r\n", "\t", "<s>", "</s>", "<unk>", "<0x41>", EOS_TOKEN, "a", "é", "e\u0301",
          "日本", "🙂", "\x00", "\u200b", "\ufeff", "'s", "1234", "—"]
any_text = st.one_of(st.text(), st.lists(st.sampled_from(TRICKY)).map("".join))
small_alphabet_docs = st.lists(st.text(alphabet="ab c\n'é1", max_size=40), min_size=1, max_size=4).filter(
    lambda docs: any(docs))
PATTERNS = [None, "gpt2", "gpt4"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def corpus():
    return shakespeare_documents(max_bytes=6_000) + ["naïve café, 日本語の文章 🙂 — “quoted” text"]


@pytest.fixture(scope="module")
def tokenizers(corpus):
    return {
        "char": CharTokenizer().train(corpus),
        "bpe-none": BPETokenizer(None).train(corpus, 400),
        "bpe-gpt4": BPETokenizer("gpt4").train(corpus, 400),
        "fast-bpe-gpt4": FastBPETokenizer("gpt4").train(corpus, 400),
        "sentencepiece": SentencePieceTokenizer().train(corpus, 400),
    }


KINDS = ["char", "bpe-none", "bpe-gpt4", "fast-bpe-gpt4", "sentencepiece"]


# --- known answers -------------------------------------------------------------------------------------------

def test_wikipedia_example():
    merges = train_bpe_naive("aaabdaaabac", 256 + 3)
    # after aa -> 256, (256, a) and (a, b) tie at 2; b"aa" > b"a" wins
    assert merges == [((97, 97), 256), ((256, 97), 257), ((257, 98), 258)]
    assert train_bpe_incremental("aaabdaaabac", 256 + 3) == merges
    assert bpe_encode("aaabdaaabac", merges) == [258, 100, 258, 97, 99]
    assert bpe_decode([258, 100, 258, 97, 99], merges) == "aaabdaaabac"


def test_get_stats_merge_and_split():
    assert get_stats([1, 2, 1, 2]) == {(1, 2): 2, (2, 1): 1}
    assert merge([5, 5, 5, 5, 5], (5, 5), 9) == [9, 9, 5]
    assert split_text("Hello world's 12345", "gpt4") == ["Hello", " world", "'s", " ", "123", "45"]


def test_tie_goes_to_greatest_bytes():
    # ab, bc and cd all occur twice; (c, d) has the greatest left bytes
    counts = get_stats(list(b"abcdabcd"))
    assert counts[(97, 98)] == counts[(98, 99)] == counts[(99, 100)] == 2 and counts[(100, 97)] == 1
    assert train_bpe_naive("abcdabcd", 257) == [((99, 100), 256)]
    # equal left bytes: the greater right bytes wins
    assert train_bpe_naive(["ab", "ac"], 257) == [((97, 99), 256)]
    assert train_bpe_incremental(["ab", "ac"], 257) == [((97, 99), 256)]


# --- incremental trainer == naive reference --------------------------------------------------------------------

HAND_PICKED = ["aaabdaaabac", "a" * 37, "ab" * 20, "aaabbbaaabbb ccc aaa", "héllo wörld héllo 日本語 日本 🙂🙂",
               ["same doc", "same doc", "other doc"], "x", "  \n\n  spaces  \n"]


@pytest.mark.parametrize("split_pattern", PATTERNS)
@pytest.mark.parametrize("text", HAND_PICKED)
def test_incremental_matches_naive_hand_picked(text, split_pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_bpe_incremental(text, 300, split_pattern) == train_bpe_naive(text, 300, split_pattern)


@pytest.mark.parametrize("split_pattern", PATTERNS)
def test_incremental_matches_naive_on_corpus(corpus, split_pattern):
    assert train_bpe_incremental(corpus, 380, split_pattern) == train_bpe_naive(corpus, 380, split_pattern)


@SETTINGS
@given(docs=small_alphabet_docs, split_pattern=st.sampled_from(PATTERNS), extra=st.integers(0, 40))
def test_incremental_matches_naive_random(docs, split_pattern, extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_bpe_incremental(docs, 256 + extra, split_pattern) == \
            train_bpe_naive(docs, 256 + extra, split_pattern)


def test_early_stop_warns():
    with pytest.warns(UserWarning, match="stopped after 2 of 10 merges"):
        merges = train_bpe_incremental("abc", 266)
    assert len(merges) == 2
    with pytest.warns(UserWarning, match="stopped after 2 of 10 merges"):
        assert train_bpe_naive("abc", 266) == merges


# --- fast encoder == reference encoder -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_merges(corpus):
    return train_bpe_incremental(corpus, 400)


@SETTINGS
@given(text=st.one_of(any_text, st.text(alphabet="ae tho\n", max_size=300)))
def test_fast_encoder_matches_reference(corpus_merges, text):
    assert encode_chunk(text.encode("utf-8"), dict(corpus_merges)) == bpe_encode(text, corpus_merges)


def test_fast_encoder_long_chunks(corpus, corpus_merges, tokenizers):
    text = "\n".join(corpus)[:4_000]
    assert encode_chunk(text.encode(), dict(corpus_merges)) == bpe_encode(text, corpus_merges)
    runs = train_bpe_naive("a" * 64, 262)
    for n in range(1, 70):
        assert encode_chunk(b"a" * n, dict(runs)) == bpe_encode("a" * n, runs)
    bpe = tokenizers["bpe-gpt4"]
    expected = [t for chunk in split_text(text, "gpt4") for t in bpe_encode(chunk, bpe.merges)]
    assert bpe.encode(text) == expected


# --- one interface, every tokenizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(text=any_text)
def test_round_trip_any_unicode(tokenizers, kind, text):
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None)
@given(texts=st.lists(any_text, max_size=5))
def test_encode_batch_matches_encode(tokenizers, kind, texts):
    tokenizer = tokenizers[kind]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load(tokenizers, corpus, kind, tmp_path):
    tokenizer = tokenizers[kind]
    directory = tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(directory, FAST_TOKENIZER_KINDS if kind.startswith("fast") else None)
    assert type(loaded) is type(tokenizer)
    assert loaded.fingerprint == tokenizer.fingerprint and len(tokenizer.fingerprint) == 64
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.special_ids == tokenizer.special_ids
    for text in corpus + TRICKY:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert type(tokenizer).load(directory).fingerprint == tokenizer.fingerprint
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_fingerprint_tells_tokenizers_apart(tokenizers, corpus):
    distinct = {name: t for name, t in tokenizers.items() if name != "fast-bpe-gpt4"}  # same as bpe-gpt4
    assert len({t.fingerprint for t in distinct.values()}) == len(distinct)
    assert tokenizers["fast-bpe-gpt4"].fingerprint == tokenizers["bpe-gpt4"].fingerprint
    assert SentencePieceTokenizer().train(corpus, 400).fingerprint == tokenizers["sentencepiece"].fingerprint
    assert BPETokenizer(None).train(corpus, 400).fingerprint == tokenizers["bpe-none"].fingerprint


def test_special_ids(tokenizers):
    assert tokenizers["sentencepiece"].special_ids == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert tokenizers["sentencepiece"].eos_id == 3
    for kind in ["char", "bpe-none", "bpe-gpt4"]:
        tokenizer = tokenizers[kind]
        assert tokenizer.special_ids == {"eos": tokenizer.vocab_size - 1} and tokenizer.eos_id == tokenizer.vocab_size - 1
        assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN
        assert tokenizer.eos_id not in tokenizer.encode(EOS_TOKEN), "text never turns into a special id"
    bpe = tokenizers["bpe-gpt4"]
    assert bpe.vocab_size == 400 and len(bpe.merges) == 400 - 257
    assert [new_id for _, new_id in bpe.merges] == list(range(256, 399))


def test_sentencepiece_never_unknown(tokenizers):
    sp = tokenizers["sentencepiece"]
    assert sp.vocab_size == 400
    assert 1 not in sp.encode("日本語 🙂 \u2581 naïve \x00 \U0010ffff")


def test_char_layout_and_cap(corpus):
    full = CharTokenizer().train(corpus)
    capped = CharTokenizer().train(corpus, vocab_size=257 + 10)
    assert capped.vocab_size == 267 and len(capped.chars) == 10 and " " in capped.chars
    assert full.encode("a") == [full.chars.index("a")]
    first_byte = len(full.chars)
    assert full.encode("\u2603") == [first_byte + b for b in "\u2603".encode()]


def test_train_tokenizer_saves(tmp_path, corpus):
    tokenizer = train_tokenizer("bpe", corpus, 300, tmp_path / "out", split_pattern="gpt2")
    assert load_tokenizer(tmp_path / "out").fingerprint == tokenizer.fingerprint
    assert make_tokenizer("sentencepiece").kind == "sentencepiece"


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece"])
@pytest.mark.parametrize("texts", ["", [], ["", ""]])
def test_empty_text_is_a_course_error(kind, texts):
    with pytest.raises(CourseError, match="no text to train on"):
        make_tokenizer(kind).train(texts, 1000)


@pytest.mark.parametrize("kind,vocab_size", [("bpe", 256), ("bpe", 0), ("char", 100), ("sentencepiece", 100)])
def test_impossible_vocab_size(kind, vocab_size, corpus):
    with pytest.raises(CourseError, match="vocab_size"):
        make_tokenizer(kind).train(corpus, vocab_size)
    with pytest.raises(CourseError, match="at least 256"):
        train_bpe_naive("abc", 255)


def test_sentencepiece_vocab_too_large_names_the_maximum(corpus):
    with pytest.raises(CourseError, match=r"at most \d+ pieces.*--vocab-size \d+ or less"):
        SentencePieceTokenizer().train(corpus[0][:2_000], 50_000)


def test_errors_name_the_fix(tmp_path, tokenizers):
    with pytest.raises(CourseError, match="openllm-edu tokenizer train"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CourseError, match="not hold a valid tokenizer"):
        load_tokenizer(tmp_path / "broken")
    with pytest.raises(CourseError, match="unknown tokenizer kind"):
        make_tokenizer("wordpiece")
    with pytest.raises(CourseError, match="not a valid regular expression"):
        BPETokenizer("(unclosed")
    with pytest.raises(CourseError, match="call .train"):
        BPETokenizer().encode("x")
    with pytest.raises(CourseError, match="outside this tokenizer's vocabulary"):
        tokenizers["bpe-gpt4"].decode([10_000])


def test_benchmark_functions_run(corpus):
    row = bench_bpe_training(vocab_size=280, split_pattern="gpt4", documents=corpus[:2])
    assert row.same_merges and row.speedup > 0
    timing = time_tokenizer_training("bpe", 300, documents=corpus, split_pattern=None)
    assert timing.vocab_size == 300 and timing.bytes_per_token > 1
    assert "same merges" in format_tokenizer_bench([row, timing])


# --- the fast BPE of deep dive 02b against chapter 02's -------------------------------------------------------

@pytest.mark.parametrize("split_pattern", PATTERNS)
def test_fast_bpe_tokenizer_equals_the_lesson_one(corpus, split_pattern, tmp_path):
    slow, fast = BPETokenizer(split_pattern).train(corpus, 350), FastBPETokenizer(split_pattern).train(corpus, 350)
    assert fast.merges == slow.merges and fast.fingerprint == slow.fingerprint
    for text in corpus + TRICKY:
        assert fast.encode(text) == slow.encode(text)
    folder = fast.save(tmp_path / "tok")
    assert type(load_tokenizer(folder)) is BPETokenizer
    assert type(load_tokenizer(folder, FAST_TOKENIZER_KINDS)) is FastBPETokenizer
    assert type(FastBPETokenizer.load(folder)) is FastBPETokenizer and type(Tokenizer.load(folder)) is BPETokenizer
    assert type(train_tokenizer("bpe", corpus, 300)) is FastBPETokenizer


def test_load_as_a_class_refuses_another_kind(tokenizers, tmp_path):
    folder = tokenizers["char"].save(tmp_path / "char")
    with pytest.raises(CourseError, match="holds a char tokenizer, not bpe"):
        BPETokenizer.load(folder)


def test_pair_heap_pops_like_most_frequent_pair_and_skips_stale_entries():
    token_bytes = [bytes([i]) for i in range(256)]
    key = [tuple(-b for b in t) + (1,) for t in token_bytes]
    counts = {(97, 98): 3, (98, 99): 3, (99, 97): 1, (120, 121): 2}
    heap = PairHeap(counts, key)
    assert heap.pop_best() == most_frequent_pair(counts, token_bytes) == (98, 99)
    del counts[(98, 99)]
    counts[(97, 98)] = 1  # lower now: the entry with count 3 is stale
    heap.push((97, 98))
    assert heap.pop_best() == most_frequent_pair(counts, token_bytes) == (120, 121)
    del counts[(120, 121)]
    assert heap.pop_best() == most_frequent_pair(counts, token_bytes) == (99, 97)  # tie at 1: b"c" > b"a"
    del counts[(99, 97)]
    assert heap.pop_best() == (97, 98)
    del counts[(97, 98)]
    assert heap.pop_best() is None


def test_tokenizer_imports_no_later_chapter():
    import subprocess
    import sys
    script = ("import sys, openllm_edu.tokenizer; "
              "print(sorted(m for m in sys.modules if m.startswith('openllm_edu.')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert eval(out.stdout) == ["openllm_edu.core", "openllm_edu.tokenizer"]


# --- more than English: the multilingual fixture ----------------------------------------------------------------

MULTILINGUAL = (Path(__file__).parent / "fixtures" / "multilingual.txt").read_text(encoding="utf-8")
MULTILINGUAL_LINES = MULTILINGUAL.splitlines()


def test_multilingual_fixture_holds_what_it_promises():
    import unicodedata
    scripts = {"CYRILLIC", "GREEK", "CJK", "HIRAGANA", "HANGUL", "ARABIC", "HEBREW"}
    names = {unicodedata.name(ch, "?").split()[0] for ch in MULTILINGUAL}
    assert scripts <= names
    assert "e\u0301" in MULTILINGUAL and "\u200d" in MULTILINGUAL and "🇩🇪" in MULTILINGUAL  # combining, ZWJ, flag
    assert unicodedata.bidirectional("ש") == "R" and unicodedata.bidirectional("م") == "AL"


@pytest.fixture(scope="module")
def multilingual_tokenizers(corpus):
    "Every kind trained on English plus the fixture's lines, so merges and pieces span multi-byte characters."
    texts = corpus + MULTILINGUAL_LINES * 3
    return {
        "char": CharTokenizer().train(texts),
        "bpe-none": BPETokenizer(None).train(texts, 600),
        "bpe-gpt4": BPETokenizer("gpt4").train(texts, 600),
        "fast-bpe-gpt4": FastBPETokenizer("gpt4").train(texts, 600),
        "sentencepiece": SentencePieceTokenizer().train(texts, 600),
    }


@pytest.mark.parametrize("trained_on", ["english", "english+multilingual"])
@pytest.mark.parametrize("kind", KINDS)
def test_multilingual_fixture_round_trips_byte_for_byte(tokenizers, multilingual_tokenizers, kind, trained_on):
    tokenizer = (tokenizers if trained_on == "english" else multilingual_tokenizers)[kind]
    ids = tokenizer.encode(MULTILINGUAL)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids).encode("utf-8") == MULTILINGUAL.encode("utf-8")
    assert [tokenizer.decode(tokenizer.encode(line)) for line in MULTILINGUAL_LINES] == MULTILINGUAL_LINES


def test_multilingual_merges_do_span_characters(multilingual_tokenizers):
    "The fixture-trained byte-level BPE has tokens that end inside a character, so streaming is really tested."
    bpe = multilingual_tokenizers["fast-bpe-gpt4"]
    pieces = [bpe.decode([i]) for i in bpe.encode(MULTILINGUAL)]
    assert any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_decode_never_splits_a_character(multilingual_tokenizers, kind):
    from openllm_edu.generate import stream_pieces
    tokenizer = multilingual_tokenizers[kind]
    pieces = list(stream_pieces(tokenizer.encode(MULTILINGUAL), tokenizer.decode))
    assert "".join(pieces) == MULTILINGUAL
    assert not any("\ufffd" in piece for piece in pieces) and all(piece.encode("utf-8") for piece in pieces)


multilingual_text = st.text(alphabet=st.sampled_from(sorted(set(MULTILINGUAL)) + ["\u0301", "\u200d", "\U0001f1e9"]),
                            max_size=120)


@pytest.mark.parametrize("kind", ["bpe-gpt4", "fast-bpe-gpt4", "bpe-none"])
@SETTINGS
@given(text=st.one_of(multilingual_text, st.text(max_size=120)))
def test_byte_level_bpe_round_trips_any_unicode(multilingual_tokenizers, kind, text):
    tokenizer = multilingual_tokenizers[kind]
    assert tokenizer.decode(tokenizer.encode(text)).encode("utf-8") == text.encode("utf-8", "surrogatepass")


# --- what a tokenizer costs per language (the real Debian fortunes) --------------------------------------------

@pytest.mark.skipif(not all((FORTUNES_DIR / FORTUNE_PACKAGES[c].paths[0]).exists() for c in ("de", "ru", "zh")),
                    reason=f"fortunes-de/-ru/-zh are not installed in {FORTUNES_DIR} "
                           "(sudo apt-get install fortunes-de fortunes-ru fortunes-zh)")
def test_a_mixed_tokenizer_costs_fewer_tokens_per_byte_on_russian_and_chinese():
    splits = {code: hash_split(load_corpus(f"fortunes-{code}")[0], 0.1) for code in ("de", "ru", "zh")}
    mixed = [doc for train, _ in splits.values() for doc in take_bytes(train, 200_000)]
    mixed += shakespeare_documents(max_bytes=200_000)
    english_only = FastBPETokenizer("gpt4").train(shakespeare_documents(max_bytes=800_000), 512)
    multilingual = FastBPETokenizer("gpt4").train(mixed, 512)
    for code in ("ru", "zh"):
        held_out = "\n".join(take_bytes(splits[code][1], 50_000))
        size = len(held_out.encode("utf-8"))
        english_cost = len(english_only.encode(held_out)) / size
        mixed_cost = len(multilingual.encode(held_out)) / size
        print(f"{code}: {mixed_cost:.3f} tokens/byte (mixed) vs {english_cost:.3f} (English only)")
        assert mixed_cost < 0.8 * english_cost, code
