import math

import pytest

from openllm_edu.core import CourseError
from openllm_edu.data import hash_split, shakespeare_documents
from openllm_edu.fast_bpe import FastBPETokenizer
from openllm_edu.multilingual import documents_by_language, format_tax_table, tokenizer_tax, tokens_per_byte
from openllm_edu.sources import FORTUNE_PACKAGES, Document, fortunes_dir, load_fortunes, sample_bytes
from openllm_edu.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def one_merge():
    "A byte-level BPE whose only merge is ('a', 'a'): 256 bytes, the end-of-text id, one merge."
    return FastBPETokenizer(split_pattern=None).train("aaaa", 258)


def test_tokens_per_byte_matches_a_hand_count(one_merge):
    # "aaaaa" -> aa aa a (3 tokens, 5 bytes); "é" -> its 2 bytes (2 tokens, 2 bytes)
    assert tokens_per_byte(one_merge, "aaaaa") == 3 / 5
    assert tokens_per_byte(one_merge, ["aaaaa", "é"]) == 5 / 7


def test_tokens_per_byte_counts_characters_for_a_char_tokenizer():
    char = CharTokenizer().train("дa中")
    # 3 characters, 2 + 1 + 3 bytes
    assert tokens_per_byte(char, "дa中") == 3 / 6


def test_tokens_per_byte_refuses_empty_text(one_merge):
    with pytest.raises(CourseError):
        tokens_per_byte(one_merge, ["", ""])


def test_tokenizer_tax_has_a_row_per_tokenizer_and_language(one_merge):
    char = CharTokenizer().train("aaé")
    rows = tokenizer_tax({"bpe": one_merge, "char": char}, {"x": ["aaaaa"], "y": ["é", "aa"]})
    got = {(r.tokenizer, r.language): (r.tokens, r.bytes) for r in rows}
    assert got == {("bpe", "x"): (3, 5), ("char", "x"): (5, 5), ("bpe", "y"): (3, 4), ("char", "y"): (3, 4)}
    table = format_tax_table(rows).splitlines()
    assert table[0].split() == ["language", "bpe", "char"]
    assert table[1].split() == ["x", "0.600", "1.000"]
    assert table[2].split() == ["y", "0.750", "0.750"]


def test_documents_by_language_groups_and_refuses_plain_strings():
    docs = [Document("a", "de"), Document("b", "ru"), Document("c", "de")]
    assert documents_by_language(docs) == {"de": ["a", "c"], "ru": ["b"]}
    with pytest.raises(CourseError):
        documents_by_language(["plain"])


LANGUAGES = ["de", "ru", "zh", "es", "it", "pl", "br"]
INSTALLED = all((fortunes_dir() / FORTUNE_PACKAGES[c].paths[0]).exists() for c in LANGUAGES)


@pytest.mark.skipif(not INSTALLED, reason="the fortunes packages are not installed (sudo apt-get install "
                    + " ".join(FORTUNE_PACKAGES[c].package for c in LANGUAGES) + ")")
def test_the_mixed_bpe_pays_less_tax_on_russian_and_chinese():
    by_language = documents_by_language(load_fortunes(LANGUAGES)[0])
    speeches = [p for scene in shakespeare_documents(max_bytes=400_000) for p in scene.split("\n\n") if p.strip()]
    by_language["en"] = speeches
    splits = {lang: hash_split(docs, 0.1) for lang, docs in by_language.items()}
    mix = [doc for train, _ in splits.values() for doc in sample_bytes(train, 25_000)]
    english = FastBPETokenizer("gpt4").train(sample_bytes(splits["en"][0], 200_000), 1024)
    mixed = FastBPETokenizer("gpt4").train(mix, 1024)
    held_out = {lang: sample_bytes(splits[lang][1], 8_000) for lang in ("en", "ru", "zh")}
    cost = {(r.language, r.tokenizer): r.tokens_per_byte
            for r in tokenizer_tax({"english": english, "mixed": mixed}, held_out)}
    for lang in ("ru", "zh"):
        assert cost[lang, "mixed"] < 0.85 * cost[lang, "english"], lang
    assert cost["en", "english"] < cost["en", "mixed"]  # the price of sharing the vocabulary


def test_bits_table_and_plot_bits_from_hand_made_scores():
    from openllm_edu.multilingual import bits_table, plot_bits
    from openllm_edu.scoring import LanguageBits

    ln2 = math.log(2)
    scores = {"english model": {"en": LanguageBits("en", 2, 30, 100, 200 * ln2),  # 2.0 bits per byte
                                "ru": LanguageBits("ru", 1, 50, 50, 600 * ln2)},  # 12.0
              "mixed model": {"ru": LanguageBits("ru", 1, 20, 50, 150 * ln2),  # 3.0
                              "en": LanguageBits("en", 2, 40, 100, 250 * ln2)}}  # 2.5
    header, en, ru = bits_table(scores).splitlines()
    assert header.split() == ["language", "english", "model", "mixed", "model"]
    assert en.split() == ["en", "2.000", "2.500"] and ru.split() == ["ru", "12.000", "3.000"]
    scores["mixed model"].pop("en")
    assert bits_table(scores).splitlines()[1].split() == ["en", "2.000", "nan"]  # a language a model was not scored on
    ax = plot_bits({"english model": scores["english model"]})
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([2.0, 12.0])
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["en", "ru"]
