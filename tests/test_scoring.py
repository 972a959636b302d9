"""Chapter 10, part 1: scoring text by log-likelihood. Every score is checked against an independent reference:
the summed `F.cross_entropy` terms of one forward pass over the whole sequence, a slow one-window-per-token
rolling score, and chapter 03's `evaluate_lm`. Models: the ci course model (BPE) and small untrained GPTs."""
import math

import pytest
import torch
import torch.nn.functional as F

from openllm_edu.core import CourseError
from openllm_edu.metrics import evaluate_lm
from openllm_edu.model import GPT, GPTConfig, course_model
from openllm_edu.scoring import (
    UNLABELLED,
    Score,
    bits_per_byte_by_language,
    choose,
    loglikelihood,
    loglikelihood_rolling,
    rolling_token_logprobs,
    rolling_windows,
    split_tokens,
)
from openllm_edu.sources import Document
from openllm_edu.tokenizer import CharTokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n")
# (context, continuation): space at the boundary, a continuation merging with the context's last token, an empty
# context, a context longer than any block_size here, a multi-token continuation, non-ASCII text
CASES = [("To be, or not to ", "be"), ("the kin", "g"), ("", "First Citizen"), ("ROMEO: what light? " * 12, " soft"),
         ("KING HENRY:\n", "What say you, my lord?"), ("Café", " crème brûlée ☃")]


@pytest.fixture(scope="module")
def bpe():
    return course_model("ci")


@pytest.fixture(scope="module")
def char():
    tokenizer = CharTokenizer().train(TEXT)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return GPT(config).eval(), tokenizer


def token_bytes(tokenizer, i: int) -> bytes:
    "The bytes one id stands for, read from the tokenizer's own tables (not through decode)."
    if isinstance(tokenizer, CharTokenizer):
        first_byte = len(tokenizer.chars)
        return bytes([i - first_byte]) if i >= first_byte else tokenizer.chars[i].encode("utf-8")
    return tokenizer.token_bytes[i]


def reference_split(tokenizer, context, continuation):
    "The fewest final tokens of the whole text whose bytes cover the continuation; the rest, or [eos], is context."
    whole, need, covered, n = tokenizer.encode(context + continuation), len(continuation.encode("utf-8")), 0, 0
    while covered < need:
        n += 1
        covered += len(token_bytes(tokenizer, whole[-n]))
    return whole[:-n] or [tokenizer.eos_id], whole[-n:]


def reference_score(model, tokenizer, context, continuation):
    "Summed log-probs and argmax flags of the continuation, from one forward pass over the whole (cropped) sequence."
    context_ids, continuation_ids = reference_split(tokenizer, context, continuation)
    ids = torch.tensor((context_ids + continuation_ids)[-(model.config.block_size + 1):])
    with torch.no_grad():
        logits = model(ids[None, :-1])[0][0]
    n = len(continuation_ids)
    losses = F.cross_entropy(logits, ids[1:], reduction="none")[-n:]
    greedy = bool((logits[-n:].argmax(-1) == ids[-n:]).all())
    return -losses.double().sum().item(), (-losses).tolist(), greedy


@pytest.mark.parametrize("which", ["bpe", "char"])
def test_loglikelihood_equals_one_forward_pass(which, request):
    model, tokenizer = request.getfixturevalue(which)
    assert len(tokenizer.encode(CASES[3][0])) > model.config.block_size  # the long context really is cut
    scores = loglikelihood(model, tokenizer, CASES)
    assert len(scores) == len(CASES)
    for (context, continuation), score in zip(CASES, scores):
        logprob, token_logprobs, greedy = reference_score(model, tokenizer, context, continuation)
        assert isinstance(score, Score)
        assert score.logprob == pytest.approx(logprob, abs=1e-5), (context, continuation)
        assert score.token_logprobs == pytest.approx(token_logprobs, abs=1e-5)
        assert score.n_tokens == len(token_logprobs) >= 1
        assert score.n_bytes == len(continuation.encode("utf-8"))
        assert score.is_greedy == greedy


def test_split_tokens_boundary_cases(bpe):
    _, tokenizer = bpe
    for context, continuation in CASES:
        context_ids, continuation_ids = split_tokens(tokenizer, context, continuation)
        assert (context_ids, continuation_ids) == reference_split(tokenizer, context, continuation)
        if context:
            assert context_ids + continuation_ids == tokenizer.encode(context + continuation)
    # the space moves into the continuation's one token; apart, it would be " " + "b" + "e"
    assert split_tokens(tokenizer, "To be, or not to ", "be")[1] == tokenizer.encode(" be")
    assert tokenizer.encode("To be, or not to ") + tokenizer.encode("be") != tokenizer.encode("To be, or not to be")
    # a continuation starting mid-token is scored with the whole straddling token
    context_ids, continuation_ids = split_tokens(tokenizer, "the kin", "g")
    assert tokenizer.decode(continuation_ids) == "ing" and tokenizer.decode(context_ids) == "the k"
    assert split_tokens(tokenizer, "", "First") == ([tokenizer.eos_id], tokenizer.encode("First"))


def test_batched_equals_one_at_a_time(bpe, char):
    for model, tokenizer in (bpe, char):
        requests = CASES + [("a", "b"), ("Speak, speak.", "\n")]
        batched = loglikelihood(model, tokenizer, requests, batch_size=3)
        alone = [loglikelihood(model, tokenizer, [request], batch_size=1)[0] for request in requests]
        for b, a in zip(batched, alone):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
            assert (b.n_tokens, b.n_bytes, b.is_greedy) == (a.n_tokens, a.n_bytes, a.is_greedy)


def test_is_greedy_against_argmax(bpe):
    model, tokenizer = bpe
    context = "KING HENRY:\n"
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    written = tokenizer.decode(ids[-3:])
    assert tokenizer.encode(context + written) == ids  # precondition: the model's own text tokenizes back the same
    greedy, = loglikelihood(model, tokenizer, [(context, written)])
    assert greedy.is_greedy
    # the same first token followed by a token that is not the argmax
    second_best = int(model(torch.tensor([ids[:-2]]))[0][0, -1].topk(2).indices[1])
    other = tokenizer.decode(ids[-3:-2] + [second_best])
    if tokenizer.encode(context + other) == ids[:-2] + [second_best]:
        assert not loglikelihood(model, tokenizer, [(context, other)])[0].is_greedy
    for (context, continuation), score in zip(CASES, loglikelihood(model, tokenizer, CASES)):
        assert score.is_greedy == reference_score(model, tokenizer, context, continuation)[2]


def test_training_mode_restored_and_dropout_off(char):
    _, tokenizer = char
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    expected = reference_score(model.eval(), tokenizer, "To be", ", or not")[0]
    model.train()
    score, = loglikelihood(model, tokenizer, [("To be", ", or not")])
    assert model.training and torch.is_grad_enabled()
    assert score.logprob == pytest.approx(expected, abs=1e-5)


def slow_rolling(model, tokens, stride):
    "One forward pass per predicted token, over the window that scores it: start 0, or the first stride step whose window reaches it."
    block_size, out = model.config.block_size, []
    for target in range(1, len(tokens)):
        begin = 0 if target <= block_size else math.ceil((target - block_size) / stride) * stride
        with torch.no_grad():
            logits = model(torch.tensor([tokens[begin:target]]))[0][0, -1]
        out.append(F.log_softmax(logits, -1)[tokens[target]].item())
    return out


@pytest.mark.parametrize("stride", [1, 5, 32])
def test_rolling_matches_slow_reference(char, stride):
    model, tokenizer = char
    tokens = [tokenizer.eos_id] + tokenizer.encode(TEXT[:90])
    logprobs, greedy = rolling_token_logprobs(model, tokens, stride=stride, batch_size=4)
    assert logprobs.tolist() == pytest.approx(slow_rolling(model, tokens, stride), abs=1e-5)
    assert len(greedy) == len(tokens) - 1


@pytest.mark.parametrize("n_tokens", [2, 9, 16, 17, 40, 101])
@pytest.mark.parametrize("stride", [1, 3, 7, 16])
def test_each_token_scored_once(n_tokens, stride):
    block_size, counts = 16, [0] * n_tokens
    for i, (begin, end, new) in enumerate(rolling_windows(n_tokens, block_size, stride)):
        assert 0 < end - begin <= block_size and 1 <= new <= end - begin
        for target in range(end - new + 1, end + 1):
            counts[target] += 1
            if i:  # after the first window every kept prediction has block_size - stride tokens of context or more
                assert target - begin >= block_size - stride
    assert counts == [0] + [1] * (n_tokens - 1)


def test_rolling_stride_block_size_equals_evaluate_lm(bpe):
    model, tokenizer = bpe
    text = TEXT * 4
    tokens = [tokenizer.eos_id] + tokenizer.encode(text)
    assert len(tokens) > 3 * model.config.block_size
    score, = loglikelihood_rolling(model, tokenizer, [text])
    chapter03 = evaluate_lm(model, tokens, len(text.encode("utf-8")), block_size=model.config.block_size)
    assert -score.logprob == pytest.approx(chapter03.nats, rel=1e-4)
    assert score.n_tokens == len(tokens) - 1 == len(score.token_logprobs) == chapter03.tokens
    assert score.n_bytes == len(text.encode("utf-8"))
    for stride in (1, 7, 32):
        strided, = loglikelihood_rolling(model, tokenizer, [text], stride=stride, batch_size=64)
        assert strided.n_tokens == len(strided.token_logprobs) == len(tokens) - 1
    short, = loglikelihood_rolling(model, tokenizer, ["Speak, speak."])  # one window: the same as an empty context
    assert short.logprob == pytest.approx(loglikelihood(model, tokenizer, [("", "Speak, speak.")])[0].logprob, abs=1e-5)


def test_choose_by_sum_token_and_byte():
    short = Score(-6.0, (-6.0,), False, 1, 3)  # largest sum
    long = Score(-10.0, (-2.0,) * 5, False, 5, 20)  # best per byte: -0.5
    tokens = Score(-8.0, (-4.0,) * 2, False, 2, 4)  # -4 per token, -2 per byte
    scores = [short, long, tokens]
    assert choose(scores) == 0
    assert choose(scores, "token") == 1  # -2 per token beats -6 and -4
    assert choose(scores, "byte") == 1
    assert choose([tokens, Score(-9.0, (-3.0,) * 3, False, 3, 3)], "token") == 1
    assert choose([tokens, Score(-9.0, (-3.0,) * 3, False, 3, 3)], "byte") == 0
    assert choose([short, short]) == 0  # a tie goes to the first


def one_line_error(call):
    with pytest.raises(CourseError) as error:
        call()
    assert "\n" not in str(error.value) and str(error.value)


def test_bad_input_is_one_line_course_error(char):
    model, tokenizer = char
    one_line_error(lambda: loglikelihood(model, tokenizer, [("context", "")]))
    one_line_error(lambda: loglikelihood(model, tokenizer, [(3, "x")]))
    one_line_error(lambda: loglikelihood(model, tokenizer, [("x", b"y")]))
    one_line_error(lambda: loglikelihood(model, tokenizer, "context"))
    one_line_error(lambda: loglikelihood(model, tokenizer, [("a", "b", "c")]))
    one_line_error(lambda: loglikelihood(model, tokenizer, [("a", "b")], batch_size=0))
    one_line_error(lambda: loglikelihood(model, tokenizer, [("", "x" * 40)]))  # 40 tokens > block_size 32
    one_line_error(lambda: split_tokens(tokenizer, "a", ""))
    one_line_error(lambda: loglikelihood_rolling(model, tokenizer, "a text"))
    one_line_error(lambda: loglikelihood_rolling(model, tokenizer, [""]))
    one_line_error(lambda: loglikelihood_rolling(model, tokenizer, [5]))
    for stride in (0, 33, -1, 2.5, True):
        one_line_error(lambda: loglikelihood_rolling(model, tokenizer, ["To be"], stride=stride))
    one_line_error(lambda: rolling_token_logprobs(model, [1]))
    one_line_error(lambda: choose([]))
    one_line_error(lambda: choose([Score(-1.0, (-1.0,), False, 1, 1)], "bytes"))


def whole_text_nats(model, tokenizer, text):
    "-ln p of every token of a short text read after eos, from one forward pass and F.cross_entropy."
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(text)]])
    assert ids.shape[1] <= model.config.block_size + 1
    with torch.no_grad():
        logits = model(ids[:, :-1])[0]
    return F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item(), ids.shape[1] - 1


def test_bits_per_byte_by_language_against_one_forward_pass_per_document(char):
    model, tokenizer = char
    docs = [Document("Speak, speak.", "en"), "All:\nSpeak.", Document("Café crème", "fr"),
            Document("ROMEO:\nBut, soft!", "en"), Document("Γειά σου", "el")]
    rows = bits_per_byte_by_language(model, tokenizer, docs, batch_size=3)
    assert list(rows) == ["en", UNLABELLED, "fr", "el"]  # the order languages first appear in
    expected = {}
    for doc in docs:
        nats, tokens = whole_text_nats(model, tokenizer, doc)
        total = expected.setdefault(getattr(doc, "language", None) or UNLABELLED, [0, 0, 0, 0.0])
        for i, value in enumerate((1, tokens, len(doc.encode("utf-8")), nats)):
            total[i] += value
    for language, (documents, tokens, n_bytes, nats) in expected.items():
        row = rows[language]
        assert (row.language, row.documents, row.tokens, row.bytes) == (language, documents, tokens, n_bytes)
        assert row.nats == pytest.approx(nats, rel=1e-5)
        assert row.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert rows["el"].bytes == 15  # 7 Greek letters of 2 bytes and a space


def test_bits_per_byte_by_language_weighs_documents_by_bytes(char):
    "A language's number is its total bits over its total bytes, not the mean of its documents' numbers."
    model, tokenizer = char
    short, long = Document("All:", "en"), Document("First Citizen:\nBefore we proceed any further.", "en")
    row = bits_per_byte_by_language(model, tokenizer, [short, long])["en"]
    one = [bits_per_byte_by_language(model, tokenizer, [doc])["en"] for doc in (short, long)]
    assert row.nats == pytest.approx(one[0].nats + one[1].nats, rel=1e-6)
    assert row.bits_per_byte == pytest.approx((one[0].nats + one[1].nats) / math.log(2) / (one[0].bytes + one[1].bytes))
    assert abs(row.bits_per_byte - (one[0].bits_per_byte + one[1].bits_per_byte) / 2) > 1e-3


def test_bits_per_byte_by_language_without_languages_is_empty_and_bad_input_errs(char):
    model, tokenizer = char
    assert bits_per_byte_by_language(model, tokenizer, ["Speak, speak.", "All:"]) == {}
    assert bits_per_byte_by_language(model, tokenizer, []) == {}
    one_line_error(lambda: bits_per_byte_by_language(model, tokenizer, [Document("", "en")]))
    one_line_error(lambda: bits_per_byte_by_language(model, tokenizer, [Document("a", "en"), 5]))
