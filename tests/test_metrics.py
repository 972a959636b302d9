"""Behaviour of openllm_edu.metrics: bigram counts and models, cross-entropy against PyTorch, perplexity, bits per
byte, evaluation of a model on a token stream, and sampling; bad input is a CourseError that says what to do."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from openllm_edu.core import CourseError
from openllm_edu.metrics import (
    BigramCounts,
    LMEvaluation,
    NeuralBigram,
    bigram_loss,
    bits_per_byte,
    bits_per_byte_from_loss,
    count_bigrams,
    count_utf8_bytes,
    cross_entropy,
    evaluate_lm,
    log_softmax,
    perplexity,
    sample_bigram,
    sample_from_probs,
)

SETTINGS = settings(max_examples=100, deadline=None)


def markov_chain(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    "A token stream drawn from a random bigram distribution with some zero transitions."
    g = torch.Generator().manual_seed(seed)
    transitions = torch.rand(vocab_size, vocab_size, generator=g) ** 4
    ids = [0]
    for _ in range(length - 1):
        ids.append(torch.multinomial(transitions[ids[-1]], 1, generator=g).item())
    return torch.tensor(ids)


# --- counting ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 9).flatmap(lambda v: st.tuples(st.just(v), st.lists(st.integers(0, v - 1), max_size=80))))
def test_count_bigrams_matches_a_counter(case):
    vocab_size, ids = case
    counts = count_bigrams(ids, vocab_size)
    assert counts.shape == (vocab_size, vocab_size) and counts.dtype == torch.int64
    expected = torch.zeros(vocab_size, vocab_size, dtype=torch.int64)
    for (i, j), n in Counter(zip(ids, ids[1:])).items():
        expected[i, j] = n
    assert torch.equal(counts, expected)


def test_count_bigrams_takes_lists_arrays_and_tensors():
    ids = [3, 1, 1, 2, 3, 1]
    expected = count_bigrams(ids, 4)
    assert torch.equal(count_bigrams(np.array(ids, dtype=np.uint16), 4), expected)
    assert torch.equal(count_bigrams(torch.tensor(ids, dtype=torch.int32), 4), expected)
    assert expected[3, 1] == 2 and expected.sum() == 5


@pytest.mark.parametrize("ids, vocab_size, words", [
    ([0, 5], 5, "outside the vocabulary"),
    ([-1, 0], 5, "outside the vocabulary"),
    ([0, 1], 0, "positive whole number"),
    ([[0, 1], [1, 0]], 3, "one flat sequence"),
])
def test_count_bigrams_rejects_bad_input(ids, vocab_size, words):
    with pytest.raises(CourseError, match=words):
        count_bigrams(ids, vocab_size)


# --- bigram models -------------------------------------------------------------------------------------------

def test_bigram_counts_probabilities_and_smoothing():
    counts = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    model = BigramCounts(counts)
    assert torch.allclose(model.probs, torch.tensor([[0.75, 0.25, 0], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.25, 0.5]]))
    smoothed = BigramCounts(counts, smoothing=1.0)
    assert torch.allclose(smoothed.probs[0], torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    assert smoothed.vocab_size == 3
    assert torch.allclose(BigramCounts.from_ids([0, 0, 1, 0], 2).probs, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))


def test_bigram_counts_forward_matches_cross_entropy_and_bigram_loss():
    ids = markov_chain(6, 500)
    counts = count_bigrams(ids, 6)
    model = BigramCounts(counts, smoothing=0.1)
    logits, loss = model(ids[:-1][None], ids[1:][None])
    assert logits.shape == (1, 499, 6)
    assert torch.allclose(loss, F.cross_entropy(model.log_probs[ids[:-1]], ids[1:]))
    assert math.isclose(loss.item(), bigram_loss(model.log_probs, counts), rel_tol=1e-5)
    assert model(ids[:5])[1] is None


def test_unsmoothed_counts_are_infinitely_wrong_on_unseen_pairs():
    model = BigramCounts(count_bigrams([0, 1, 0, 1], 2))
    assert math.isinf(bigram_loss(model.log_probs, count_bigrams([0, 0], 2)))
    assert bigram_loss(model.log_probs, count_bigrams([0, 1, 0], 2)) == 0.0


@pytest.mark.parametrize("counts, smoothing, words", [
    (torch.zeros(2, 3, dtype=torch.long), 0.0, "square"),
    (torch.zeros(2, 2, dtype=torch.long), -1.0, "smoothing"),
])
def test_bigram_counts_rejects_bad_input(counts, smoothing, words):
    with pytest.raises(CourseError, match=words):
        BigramCounts(counts, smoothing)


def test_bigram_loss_needs_bigrams():
    with pytest.raises(CourseError, match="no bigrams"):
        bigram_loss(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_neural_bigram_starts_uniform_and_learns_the_counts():
    vocab_size = 8
    ids = markov_chain(vocab_size, 4_000, seed=1)
    counts = count_bigrams(ids, vocab_size)
    best = bigram_loss(BigramCounts(counts).log_probs, counts)
    torch.manual_seed(0)
    model = NeuralBigram(vocab_size)
    _, loss = model(ids[:-1], ids[1:])
    assert math.isclose(loss.item(), math.log(vocab_size), rel_tol=1e-6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.3)
    for _ in range(300):
        _, loss = model(ids[:-1], ids[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = bigram_loss(F.log_softmax(model.logits.weight.detach(), -1), counts)
    assert best - 1e-5 <= final < best + 0.01


def test_neural_bigram_rejects_a_bad_vocab_size():
    with pytest.raises(CourseError, match="vocab_size"):
        NeuralBigram(0)


# --- cross-entropy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (2, 6, 11), (3, 1, 4, 9), (1, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_cross_entropy_matches_pytorch(shape, reduction, ignore_index):
    g = torch.Generator().manual_seed(hash((shape, reduction, ignore_index)) % 2**31)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(shape[-1], shape[:-1], generator=g)
    targets.view(-1)[:-1][torch.rand(targets.numel() - 1, generator=g) < 0.3] = ignore_index
    targets.view(-1)[-1] = shape[-1] - 1 if ignore_index != shape[-1] - 1 else 0
    if shape[-1] == 1 and ignore_index == 0:
        ignore_index = -100  # a one-token vocabulary has no id to spare
    ours = cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    theirs = F.cross_entropy(logits.reshape(-1, shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                             reduction=reduction).reshape(ours.shape)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_cross_entropy_is_stable_and_differentiable():
    g = torch.Generator().manual_seed(0)
    huge = torch.randn(6, 10, generator=g) * 1e4
    targets = torch.tensor([0, 3, -100, 9, 1, -100])
    assert torch.isfinite(cross_entropy(huge, targets))
    assert torch.allclose(cross_entropy(huge, targets), F.cross_entropy(huge, targets))
    a = torch.randn(6, 10, generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    cross_entropy(a, targets).backward()
    F.cross_entropy(b, targets).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_cross_entropy_hand_values_and_low_precision():
    assert math.isclose(cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item(), math.log(4), rel_tol=1e-6)
    logits = torch.tensor([[math.log(0.25), math.log(0.75)]])
    assert math.isclose(cross_entropy(logits, torch.tensor([1])).item(), -math.log(0.75), rel_tol=1e-6)
    low = torch.randn(4, 5).bfloat16()
    assert cross_entropy(low, torch.arange(4)).dtype == torch.float32
    assert torch.allclose(cross_entropy(low, torch.arange(4)), F.cross_entropy(low.float(), torch.arange(4)))
    assert cross_entropy(torch.zeros(2, 3), torch.tensor([-100, -100]), reduction="sum") == 0


def test_log_softmax_matches_pytorch():
    x = torch.randn(3, 4, 5) * 100
    for dim in (0, 1, -1):
        assert torch.allclose(log_softmax(x, dim=dim), F.log_softmax(x, dim=dim), atol=1e-4)


@pytest.mark.parametrize("logits, targets, kwargs, words", [
    (torch.zeros(2, 3), torch.tensor([-100, -100]), {}, "no targets"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {}, "no targets"),
    (torch.zeros(2, 3), torch.tensor([[0, 1]]), {}, "shape"),
    (torch.zeros(2, 3), torch.tensor([0, 3]), {}, r"\[0, 3\)"),
    (torch.zeros(2, 3), torch.tensor([0, 1]), {"reduction": "avg"}, "reduction"),
])
def test_cross_entropy_rejects_bad_input(logits, targets, kwargs, words):
    with pytest.raises(CourseError, match=words):
        cross_entropy(logits, targets, **kwargs)


# --- perplexity and bits per byte ----------------------------------------------------------------------------

def test_perplexity():
    assert math.isclose(perplexity(math.log(50)), 50)
    assert math.isclose(perplexity(torch.tensor(1.0)), math.e, rel_tol=1e-6)
    assert perplexity(0.0) == 1.0


def test_bits_per_byte_hand_values():
    assert math.isclose(bits_per_byte(1000 * math.log(256), 1000), 8)
    assert math.isclose(bits_per_byte(torch.tensor(math.log(2) * 6), 3), 2, rel_tol=1e-6)
    assert math.isclose(bits_per_byte_from_loss(math.log(4), 10, 20), 1)
    assert bits_per_byte(0.0, 5) == 0.0


def test_count_utf8_bytes():
    assert count_utf8_bytes("héllo") == 6
    assert count_utf8_bytes(["日本", "🙂", ""]) == 10
    assert count_utf8_bytes(b"\x00\xff") == 2


@pytest.mark.parametrize("nats, n_bytes, words", [
    (1.0, 0, "positive"), (1.0, -2, "positive"), (1.0, True, "positive"), (1.0, "12", "positive"),
    (1.0, float("inf"), "positive"), (float("nan"), 3, "total_nats"), (-0.5, 3, "total_nats"),
])
def test_bits_per_byte_rejects_bad_input(nats, n_bytes, words):
    with pytest.raises(CourseError, match=words):
        bits_per_byte(nats, n_bytes)


# --- evaluation on a token stream ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream():
    ids = markov_chain(7, 1_000, seed=2)
    model = BigramCounts(count_bigrams(ids[:600], 7), smoothing=0.5)
    return ids[600:], model


@pytest.mark.parametrize("block_size, batch_size", [(1, 1), (7, 3), (64, 2), (1_000, 8)])
def test_evaluate_lm_scores_every_prediction_once(stream, block_size, batch_size):
    ids, model = stream
    result = evaluate_lm(model, ids, n_bytes=1_234, block_size=block_size, batch_size=batch_size)
    slow = -sum(model.log_probs[i, j].double().item() for i, j in zip(ids.tolist(), ids[1:].tolist()))
    assert isinstance(result, LMEvaluation)
    assert result.tokens == len(ids) - 1 and result.bytes == 1_234
    assert math.isclose(result.nats, slow, rel_tol=1e-5)
    assert math.isclose(result.loss, slow / (len(ids) - 1), rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(result.loss))
    assert math.isclose(result.bits_per_byte, slow / (math.log(2) * 1_234), rel_tol=1e-5)
    assert set(result.to_dict()) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "nats"}
    assert "bits/byte" in str(result)


def test_evaluate_lm_prefix_plain_functions_and_token_files(stream, tmp_path):
    ids, model = stream
    prefix = evaluate_lm(model, ids, n_bytes=800, block_size=16, max_tokens=100)
    assert prefix.tokens == 100 and math.isclose(prefix.bytes, 800 * 100 / (len(ids) - 1))
    assert math.isclose(prefix.loss, bigram_loss(model.log_probs, count_bigrams(ids[:101], 7)), rel_tol=1e-5)
    as_function = evaluate_lm(lambda idx: model.log_probs[idx], ids, n_bytes=800, block_size=16)
    assert math.isclose(as_function.loss, evaluate_lm(model, ids, n_bytes=800).loss, rel_tol=1e-6)
    path = tmp_path / "val.bin"
    ids.numpy().astype(np.uint16).tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    assert math.isclose(evaluate_lm(model, memmap, n_bytes=800).loss, as_function.loss, rel_tol=1e-6)


def test_evaluate_lm_restores_training_mode(stream):
    ids, _ = stream
    model = NeuralBigram(7)
    model.train()
    result = evaluate_lm(model, ids, n_bytes=100)
    assert model.training
    assert math.isclose(result.loss, math.log(7), rel_tol=1e-6)


@pytest.mark.parametrize("tokens, n_bytes, kwargs, words", [
    ([1], 10, {}, "at least 2 tokens"),
    ([1, 2, 3], 0, {}, "total_bytes"),
    ([1, 2, 3], 10, {"block_size": 0}, "block_size"),
])
def test_evaluate_lm_rejects_bad_input(stream, tokens, n_bytes, kwargs, words):
    _, model = stream
    with pytest.raises(CourseError, match=words):
        evaluate_lm(model, tokens, n_bytes, **kwargs)


# --- sampling ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_sample_from_probs_is_torch_multinomial(shape):
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(0)) ** 2
    ours = sample_from_probs(weights, torch.Generator().manual_seed(3))
    theirs = torch.multinomial(weights.reshape(-1, 5), 1, generator=torch.Generator().manual_seed(3))
    assert ours.shape == shape[:-1] and ours.dtype == torch.int64
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


def test_sample_from_probs_follows_the_distribution():
    probs = torch.tensor([0.05, 0.0, 0.7, 0.25])
    draws = sample_from_probs(probs.expand(200_000, 4), torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(draws, minlength=4) / len(draws), probs, atol=0.005)
    assert (draws != 1).all()


@pytest.mark.parametrize("probs", [torch.tensor([0.5, -0.1]), torch.tensor([0.0, 0.0]),
                                   torch.tensor([float("nan"), 1.0]), torch.tensor(1.0), torch.zeros(3, 0)])
def test_sample_from_probs_rejects_bad_input(probs):
    with pytest.raises(CourseError, match="probs"):
        sample_from_probs(probs)


def test_sample_bigram_is_reproducible_and_follows_the_table():
    cycle = BigramCounts(count_bigrams([0, 1, 2, 0, 1, 2, 0], 3))
    assert sample_bigram(cycle, 0, 7) == [1, 2, 0, 1, 2, 0, 1]
    model = BigramCounts(count_bigrams(markov_chain(6, 300), 6), smoothing=1.0)
    first = sample_bigram(model, 0, 50, torch.Generator().manual_seed(5))
    assert first == sample_bigram(model, 0, 50, torch.Generator().manual_seed(5))
    assert first != sample_bigram(model, 0, 50, torch.Generator().manual_seed(6))
    assert len(first) == 50 and all(0 <= i < 6 for i in first)
