"""Generation: logit transforms against slow references and hand-made distributions, the sampling loop,
streaming and stop strings, and token-for-token equality of generation with and without the KV cache.

Models are tiny and untrained: equality of the two paths does not need sensible text.
"""
import math
import random

import pytest
import torch

from openllm_edu.attention import causal_attention
from openllm_edu.core import CourseError
from openllm_edu.generate import (
    CachedLogits,
    GenerationConfig,
    apply_repetition_penalty,
    apply_temperature,
    context_logits,
    generate,
    generate_text,
    kv_cache_bytes,
    kv_cache_step,
    sample_tokens,
    stream_pieces,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from openllm_edu.model import GPT, GPTConfig, load_pretrained, save_pretrained
from openllm_edu.tokenizer import BPETokenizer

INF = math.inf
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles. Ô Roméo, 日本 🙂!\n\n")


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer(None).train([TEXT.encode("ascii", "ignore").decode()], 300)  # é, 日, 🙂 stay bytes


def tiny_model(vocab_size=300, block_size=16, seed=0, **options) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig.preset("tiny", vocab_size=vocab_size, block_size=block_size, n_layer=2, n_embd=64,
                              **options)
    return GPT(config).eval()


# ------------------------------------------------------------------ logit transforms

def test_temperature_zero_is_greedy_without_dividing():
    logits = torch.tensor([[1.0, 5.0, 5.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    greedy = apply_temperature(logits, 0)
    assert greedy.isfinite().tolist() == [[False, True, False, False], [True, False, False, False]]
    assert not torch.isnan(torch.softmax(greedy, -1)).any()
    assert torch.equal(apply_temperature(logits, 1.0), logits)
    assert torch.allclose(apply_temperature(logits, 2.0), logits / 2)


def top_k_reference(row, k):
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return [x if x >= kth else -INF for x in row]


def test_top_k_against_reference_with_ties():
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randint(-3, 4, (3, 8), generator=gen).float()
        k = int(torch.randint(1, 11, (), generator=gen))
        assert top_k_filter(x, k).tolist() == [top_k_reference(r, k) for r in x.tolist()]
    assert top_k_filter(torch.tensor([1.0, 3.0, 3.0, 3.0]), 2).tolist() == [-INF, 3.0, 3.0, 3.0]


HAND_MADE = [0.10, 0.50, 0.05, 0.20, 0.15]  # sorted: 0.50 0.20 0.15 0.10 0.05 -> 0.50 0.70 0.85 0.95 1.00


@pytest.mark.parametrize("p, kept", [(0.01, {1}), (0.45, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}),
                                     (0.9, {0, 1, 3, 4}), (0.97, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_on_a_hand_made_distribution(p, kept):
    logits = torch.tensor(HAND_MADE).log()
    out = top_p_filter(logits, p)
    assert set(torch.nonzero(out.isfinite()).flatten().tolist()) == kept
    assert torch.equal(out[sorted(kept)], logits[sorted(kept)])


def test_top_p_boundary_ties_and_tiny_probabilities():
    assert top_p_filter(torch.zeros(4), 0.5).isfinite().tolist() == [True, True, False, False]  # 0.5 is reached
    assert top_p_filter(torch.zeros(4), 0.6).isfinite().tolist() == [True, True, True, False]  # ties by id
    tiny = torch.tensor([0.0, -200.0])  # exp(-200) rounds to probability 0
    assert top_p_filter(tiny, 1.0).isfinite().all() and top_p_filter(tiny, 0.999).isfinite().sum() == 1


def top_p_reference(row, p):
    probs = torch.softmax(torch.tensor(row, dtype=torch.float64), -1).tolist()
    keep, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: (-probs[i], i)):
        if p < 1 and mass >= p:
            break
        keep.add(i)
        mass += probs[i]
    return [x if i in keep else -INF for i, x in enumerate(row)]


def test_top_p_against_slow_reference():
    gen, rng, checked = torch.Generator().manual_seed(2), random.Random(2), 0
    while checked < 300:
        x = torch.randn(2, rng.randrange(1, 20), generator=gen) * rng.choice([0.3, 1, 4])
        p = rng.uniform(0.01, 0.99)
        sorted_probs = torch.sort(torch.softmax(x.double(), -1), -1, descending=True).values
        if ((sorted_probs.cumsum(-1) - sorted_probs - p).abs() < 1e-5).any():
            continue  # a boundary within rounding: either answer is right
        assert top_p_filter(x, p).tolist() == [top_p_reference(r, p) for r in x.tolist()]
        checked += 1


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1, 1, 4]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0], "each seen token once; positive /2, negative *2"
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([0, 3]), 1.0), logits)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        x, previous = torch.randn(3, 7, generator=gen), torch.randint(0, 7, (3, 6), generator=gen)
        expected = [[(v / 1.4 if v > 0 else v * 1.4) if i in set(prev) else v for i, v in enumerate(row)]
                    for row, prev in zip(x.tolist(), previous.tolist())]
        assert torch.allclose(apply_repetition_penalty(x, previous, 1.4), torch.tensor(expected))


@pytest.mark.parametrize("field, value", [("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("temperature", -0.1),
                                          ("temperature", math.nan), ("top_k", 0), ("top_k", 2.5),
                                          ("repetition_penalty", 0.0), ("max_new_tokens", -1),
                                          ("stop_strings", ("",)), ("seed", "abc")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(CourseError, match=field):
        GenerationConfig(**{field: value})


def test_config_accepts_boundaries():
    GenerationConfig(top_p=1.0, top_k=1, temperature=0, max_new_tokens=0)
    assert GenerationConfig(stop_strings="\n\n").stop_strings == ("\n\n",)


# ------------------------------------------------------------------ the sampling loop

def table_logits(table):
    return lambda idx: table[idx[:, -1]]


def test_sampling_loop_is_reproducible_and_greedy_follows_argmax():
    table = torch.randn(20, 20, generator=torch.Generator().manual_seed(4))
    prompt = torch.tensor([[3], [7]])
    config = GenerationConfig(max_new_tokens=30, temperature=1.2, top_k=8, top_p=0.9, seed=11)
    first = torch.stack(list(sample_tokens(table_logits(table), prompt, config)), 1)
    torch.manual_seed(999)
    assert torch.equal(first, torch.stack(list(sample_tokens(table_logits(table), prompt, config)), 1))
    other = GenerationConfig(max_new_tokens=30, temperature=1.2, top_k=8, top_p=0.9, seed=12)
    assert not torch.equal(first, torch.stack(list(sample_tokens(table_logits(table), prompt, other)), 1))
    greedy = torch.stack(list(sample_tokens(table_logits(table), prompt, GenerationConfig(10, temperature=0))), 1)
    previous = prompt[:, 0]
    for t in range(10):
        previous = table[previous].argmax(-1)
        assert torch.equal(greedy[:, t], previous)


def test_sampling_loop_stops_at_eos_and_pads_finished_rows():
    table = torch.full((5, 5), -10.0)
    table[0, 1] = table[1, 4] = table[2, 3] = table[3, 4] = 10.0  # 0 -> 1 -> 4 ; 2 -> 3 -> 4
    table[4, 0] = 10.0
    out = torch.stack(list(sample_tokens(table_logits(table), torch.tensor([[0], [2]]),
                                         GenerationConfig(10, temperature=0), eos_id=1)), 1)
    assert out.tolist() == [[1, 1, 1, 1], [3, 4, 0, 1]], "row 0 ends at once and is padded with eos"
    out = list(sample_tokens(table_logits(table), torch.tensor([[0]]), GenerationConfig(10, temperature=0),
                             eos_id=4))
    assert [int(t) for t in out] == [1, 4]
    no_stop = GenerationConfig(6, temperature=0, stop_at_eos=False)
    assert len(list(sample_tokens(table_logits(table), torch.tensor([[0]]), no_stop, eos_id=4))) == 6


# ------------------------------------------------------------------ streaming and stop strings

def test_streaming_never_splits_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text needs multi-token characters"
    pieces = list(stream_pieces(ids, tokenizer.decode))
    assert "".join(pieces) == TEXT
    assert all(p and "\ufffd" not in p for p in pieces)


def test_stop_strings_are_not_returned_and_end_consumption(tokenizer):
    ids = tokenizer.encode(TEXT)
    for stop in ["question", "日本", "\n\n", "or not", "s"]:
        consumed = []
        pieces = list(stream_pieces((consumed.append(i) or i for i in ids), tokenizer.decode, stop_strings=[stop]))
        assert "".join(pieces) == TEXT[:TEXT.index(stop)]
        assert tokenizer.decode(consumed).startswith(TEXT[:TEXT.index(stop) + len(stop)])
        assert stop not in tokenizer.decode(consumed[:-1]), "no token is consumed after the stop string"
    earliest = "".join(stream_pieces(ids, tokenizer.decode, stop_strings=["the", "be,"]))
    assert earliest == "To "
    held = list(stream_pieces(tokenizer.encode("a\nb\n\nc"), tokenizer.decode, stop_strings=["\n\n"]))
    assert "".join(held) == "a\nb"


def test_streaming_after_a_prompt_decodes_in_context(tokenizer):
    prompt, rest = tokenizer.encode("To be, or "), tokenizer.encode("not to be")
    assert "".join(stream_pieces(rest, tokenizer.decode, prompt_ids=prompt)) == "not to be"


# ------------------------------------------------------------------ the KV cache

def test_kv_cache_step_equals_full_causal_attention():
    q, k, v = torch.randn(3, 2, 3, 10, 8, generator=torch.Generator().manual_seed(5))
    k_all, v_all, outputs = k[:, :, :0], v[:, :, :0], []
    for start, end in [(0, 4), (4, 5), (5, 8), (8, 9), (9, 10)]:
        out, k_all, v_all = kv_cache_step(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], k_all, v_all)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, -2), causal_attention(q, k, v), atol=1e-6, rtol=1e-6)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)


VARIANTS = {"learned": {}, "rope": dict(pos="rope"), "rope+gqa+window": dict(pos="rope", n_kv_head=2, window=6),
            "learned+window": dict(window=6)}
CONFIGS = {"greedy": GenerationConfig(40, temperature=0),
           "sampled": GenerationConfig(40, temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=7)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", CONFIGS)
def test_cache_gives_the_same_tokens_even_past_the_context(variant, how):
    model = tiny_model(**VARIANTS[variant])
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(6))
    cached = generate(model, prompt, CONFIGS[how], use_cache=True)
    uncached = generate(model, prompt, CONFIGS[how], use_cache=False)
    assert cached.shape == (2, 45) and 45 > model.config.block_size
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


def test_cached_logits_refill_past_the_window():
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(8))
    cached = CachedLogits(model, batch_size=1)
    with torch.no_grad():
        for t in range(3, 31):
            torch.testing.assert_close(cached(ids[:, :t]), context_logits(model, ids[:, :t]), atol=1e-4, rtol=1e-4)
    assert cached.refills == 30 - 16


def test_prompt_checks(tokenizer):
    model = tiny_model()
    with pytest.raises(CourseError, match="block_size=16"):
        generate(model, torch.zeros(1, 17, dtype=torch.long), GenerationConfig(5))
    with pytest.raises(CourseError, match="block_size=16"):
        stream_text(model, tokenizer, TEXT, GenerationConfig(5))  # raised at the call, before iterating
    with pytest.raises(CourseError, match="no tokens"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), GenerationConfig(5))
    with pytest.raises(CourseError, match="stop strings"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), GenerationConfig(5, stop_strings=["x"]))
    windowed = tiny_model(window=6)  # learned positions + window: reads the last block_size tokens
    assert generate(windowed, torch.zeros(1, 20, dtype=torch.long), GenerationConfig(3)).shape == (1, 23)
    with pytest.raises(CourseError, match="vocab_size"):
        stream_text(tiny_model(vocab_size=100), tokenizer, "To be", GenerationConfig(5))


def test_generate_restores_training_mode():
    model = tiny_model().train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), GenerationConfig(3))
    assert model.training


def test_stream_text_equals_generate_text_with_and_without_cache(tokenizer):
    model = tiny_model(block_size=24, pos="rope")
    config = GenerationConfig(30, temperature=0.9, top_p=0.95, seed=3)
    pieces = list(stream_text(model, tokenizer, "To be, or", config))
    text = "".join(pieces)
    assert text == generate_text(model, tokenizer, "To be, or", config)
    assert text == generate_text(model, tokenizer, "To be, or", config, use_cache=False)
    assert text == generate_text(model, tokenizer, "To be, or", config)  # same seed, same text
    prompt = tokenizer.encode("To be, or")
    ids = generate(model, torch.tensor([prompt]), config)[0, len(prompt):].tolist()
    assert text == tokenizer.decode(ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids)
    stop = next(text[i:i + 2] for i in range(4, len(text)) if "\ufffd" not in text[i:i + 2])
    config_stop = GenerationConfig(30, temperature=0.9, top_p=0.95, seed=3, stop_strings=[stop])
    assert generate_text(model, tokenizer, "To be, or", config_stop) == text[:text.index(stop)]
    assert generate_text(model, tokenizer, "", GenerationConfig(5, seed=1)) is not None  # starts from eos


def test_saved_checkpoint_generates_the_same_text(tokenizer, tmp_path):
    "What `openllm-edu generate --checkpoint DIR` does: load_pretrained, then stream_text."
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "ckpt")
    config = GenerationConfig(20, temperature=0.8, top_k=20, seed=5)
    assert "".join(stream_text(loaded, loaded_tokenizer, "To be", config)) == \
        generate_text(model, tokenizer, "To be", config)


def test_kv_cache_bytes_matches_the_cache():
    model = tiny_model(n_kv_head=2)
    cache = model.new_kv_cache(3)
    assert kv_cache_bytes(model.config, batch_size=3) == 2 * cache.k.numel() * cache.k.element_size()
    assert kv_cache_bytes(GPTConfig.preset("small")) == 2 * 6 * 8 * 1024 * 64 * 4
