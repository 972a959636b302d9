"""Continuous batching (chapter 15): a batched row gives the logits of the row alone, the engine gives chapter 06's
tokens whoever shares the batch, and its scheduling rules (cancel, queue limit, vocabulary limit, eos, context,
errors, stop) hold. Models are tiny and untrained; every wait is bounded by a timeout."""
import queue
import threading

import pytest
import torch
import torch.nn as nn

from openllm_edu.attention import causal_mask
from openllm_edu.batching import BatchedKVCache, Engine, QueueFull, Request, Stream
from openllm_edu.core import CourseError
from openllm_edu.generate import GenerationConfig, generate
from openllm_edu.model import GPT, GPTConfig

TIMEOUT = 30.0
SHAPES = {
    "gpt2": dict(),
    "llama": dict(n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False),
    "mistral": dict(n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False,
                    window=5),
}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [30, 31, 32, 33, 34]]


def tiny_model(shape: str = "gpt2", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    values = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, **SHAPES[shape])
    return GPT(GPTConfig(**{**values, **overrides})).eval()


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0)


def read_all(stream: Stream, timeout: float = TIMEOUT) -> list[int]:
    tokens = []
    while (token := stream.get(timeout=timeout)) is not None:
        tokens.append(token)
    return tokens


def run_until_idle(engine: Engine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.step():
            return
    raise AssertionError(f"the engine was still busy after {max_steps} steps")


def alone(model: GPT, ids: list[int], config: GenerationConfig) -> list[int]:
    return generate(model, torch.tensor([ids]), config)[0, len(ids):].tolist()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_logits_equal_each_row_alone(shape):
    model = tiny_model(shape)
    cache = BatchedKVCache.for_model(model, batch_size=6)
    slots, sequences, worst = [4, 0, 2, 5], [list(p) for p in PROMPTS], 0.0
    with torch.no_grad():
        for slot, seq in zip(slots, sequences):
            cache.use_rows([slot])
            seq.append(int(model(torch.tensor([seq]), kv_cache=cache)[0][0, -1].argmax()))
        for _ in range(6):
            cache.use_rows(slots)
            logits = model(torch.tensor([[seq[-1]] for seq in sequences]), kv_cache=cache)[0][:, -1]
            for row, seq in enumerate(sequences):
                reference = model(torch.tensor([seq]))[0][0, -1]
                worst = max(worst, (logits[row] - reference).abs().max().item())
                seq.append(int(logits[row].argmax()))
    assert cache.lengths == [len(sequences[1]) - 1, 0, len(sequences[2]) - 1, 0, len(sequences[0]) - 1,
                             len(sequences[3]) - 1]
    assert worst < 1e-5


def test_mask_of_one_row_is_the_causal_mask():
    cache = BatchedKVCache(n_layer=1, batch_size=3, n_kv_head=1, max_len=16, head_dim=2)
    cache.lengths = [7, 3, 0]
    for slot, window in [(0, None), (1, None), (0, 3), (2, 2)]:
        cache.use_rows([slot])
        t = 4
        expected = causal_mask(t, cache.lengths[slot] + t, window=window)
        assert torch.equal(cache.attention_mask(t, window)[0, 0], expected)
    cache.use_rows([0])
    with pytest.raises(CourseError, match="max_len=16"):
        cache.positions(10)


def test_greedy_tokens_equal_generate_as_requests_join():
    model = tiny_model()
    engine = Engine(model, eos_id=None, max_batch=3)
    configs = [greedy(6), greedy(9), greedy(4), greedy(7)]
    streams = [engine.submit(Request(PROMPTS[i], configs[i])) for i in range(2)]
    engine.step()
    engine.step()
    streams += [engine.submit(Request(PROMPTS[i], configs[i])) for i in range(2, 4)]  # one must wait for a slot
    engine.step()
    assert engine.running == 3 and engine.waiting == 1
    run_until_idle(engine)
    for ids, config, stream in zip(PROMPTS, configs, streams):
        assert read_all(stream) == alone(model, ids, config)
        assert stream.finish_reason == "length" and stream.completion_tokens == config.max_new_tokens
        assert stream.prompt_tokens == len(ids)


def test_engine_thread_serves_concurrent_readers():
    model = tiny_model("llama")
    engine = Engine(model, eos_id=None, max_batch=2).start()
    results = {}

    def ask(i):
        results[i] = read_all(engine.submit(Request(PROMPTS[i], greedy(5 + i))))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        engine.stop()
    assert {i: alone(model, PROMPTS[i], greedy(5 + i)) for i in range(4)} == results


def test_seeded_sampling_is_the_same_alone_and_batched():
    model = tiny_model("llama")
    seeded = Request(PROMPTS[1], GenerationConfig(max_new_tokens=12, temperature=1.2, top_p=0.95, seed=5))

    def tokens_of(requests, index):
        engine = Engine(model, eos_id=None, max_batch=4)
        streams = [engine.submit(r) for r in requests]
        run_until_idle(engine)
        return read_all(streams[index])

    others = [Request(p, GenerationConfig(max_new_tokens=10, temperature=1.0)) for p in (PROMPTS[0], PROMPTS[2])]
    by_itself = tokens_of([seeded], 0)
    assert by_itself == tokens_of([others[0], seeded, others[1]], 1)
    other_seed = Request(seeded.prompt_ids, GenerationConfig(max_new_tokens=12, temperature=1.2, top_p=0.95, seed=6))
    assert by_itself != tokens_of([other_seed], 0)  # the seed matters, so the equality above means something


def test_cancel_frees_the_slot_for_a_waiting_request():
    engine = Engine(tiny_model(), eos_id=None, max_batch=1)
    first, second = (engine.submit(Request(p, greedy(20))) for p in PROMPTS[:2])
    engine.step()
    assert (engine.running, engine.waiting) == (1, 1)
    first.cancel()
    engine.step()
    assert first.finish_reason == "cancelled" and first.get(timeout=1) is not None  # its tokens stay readable
    assert (engine.running, engine.waiting) == (1, 0) and engine.slots[0].stream is second
    third = engine.submit(Request(PROMPTS[2], greedy(3)))
    third.cancel()  # cancelled while waiting: never runs
    engine.step()
    assert third.finish_reason == "cancelled" and third.completion_tokens == 0 and engine.waiting == 0


def test_queue_full():
    engine = Engine(tiny_model(), eos_id=None, max_batch=1, max_queue=2)
    engine.submit(Request([1], greedy(2)))
    engine.submit(Request([2], greedy(2)))
    with pytest.raises(QueueFull, match="2 requests"):
        engine.submit(Request([3], greedy(2)))
    assert issubclass(QueueFull, CourseError)
    engine.step()  # one is admitted: room again
    engine.submit(Request([3], greedy(2)))


def test_vocab_limit_never_samples_ids_above_it():
    limit = 40
    model = tiny_model(tie_embeddings=False, vocab_size=64)
    model.lm_head = nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[limit:] = 3.0  # the model prefers the ids a tokenizer of 40 could not decode
    configs = [greedy(8), GenerationConfig(max_new_tokens=25, temperature=1.0, seed=0)]

    def sampled(vocab_limit):
        engine = Engine(model, eos_id=None, vocab_limit=vocab_limit, max_batch=2)
        streams = [engine.submit(Request(PROMPTS[0], c)) for c in configs]
        run_until_idle(engine)
        return [t for s in streams for t in read_all(s)]

    assert max(sampled(None)) >= limit  # without the limit, high ids do come out
    limited = sampled(limit)
    assert len(limited) == 33 and max(limited) < limit


def test_eos_finishes_with_stop():
    model = tiny_model()
    expected = alone(model, PROMPTS[1], greedy(5))
    eos = expected[2]
    engine = Engine(model, eos_id=eos, max_batch=2)
    stops = engine.submit(Request(PROMPTS[1], greedy(5)))
    ignores = engine.submit(Request(PROMPTS[1], GenerationConfig(max_new_tokens=5, temperature=0, stop_at_eos=False)))
    run_until_idle(engine)
    assert read_all(stops) == expected[:expected.index(eos)] and stops.finish_reason == "stop"
    assert read_all(ignores) == expected and ignores.finish_reason == "length"


def test_context_full_finishes_with_length():
    model = tiny_model(block_size=16)
    engine = Engine(model, eos_id=None)
    long = engine.submit(Request(list(range(1, 21)), greedy(50)))
    short = engine.submit(Request(PROMPTS[1], greedy(50)))
    nothing = engine.submit(Request(PROMPTS[0], greedy(0)))
    run_until_idle(engine)
    assert long.prompt_tokens == 15 and read_all(long) == alone(model, list(range(6, 21)), greedy(1))
    assert long.finish_reason == "length"
    assert read_all(short) == alone(model, PROMPTS[1], greedy(16 - len(PROMPTS[1])))
    assert short.finish_reason == "length" and short.completion_tokens == 8
    assert read_all(nothing) == [] and nothing.finish_reason == "length"


def test_an_error_ends_the_streams_it_touched_and_the_engine_goes_on():
    model = tiny_model()
    engine = Engine(model, eos_id=None, max_batch=2)
    forward = model.forward
    failing = {"prefill of 5": False, "decode": False}

    def sometimes_failing(idx, *args, **kwargs):
        if failing["prefill of 5"] and idx.shape[1] == 5:
            raise RuntimeError("prefill broke\nsecond line")
        if failing["decode"] and idx.shape[1] == 1:
            raise RuntimeError("decode broke")
        return forward(idx, *args, **kwargs)

    model.forward = sometimes_failing
    failing["prefill of 5"] = True
    survivor = engine.submit(Request(PROMPTS[0], greedy(4)))
    broken = engine.submit(Request(PROMPTS[3], greedy(4)))
    engine.step()
    assert broken.finish_reason == "error" and broken.error == "RuntimeError: prefill broke"
    run_until_idle(engine)
    assert read_all(survivor) == alone(model, PROMPTS[0], greedy(4)) and survivor.finish_reason == "length"

    failing.update({"prefill of 5": False, "decode": True})
    both = [engine.submit(Request(p, greedy(4))) for p in PROMPTS[:2]]
    engine.step()
    assert [s.finish_reason for s in both] == ["error", "error"] and engine.running == 0
    failing["decode"] = False
    after = engine.submit(Request(PROMPTS[2], greedy(3)))
    run_until_idle(engine)
    assert read_all(after) == alone(model, PROMPTS[2], greedy(3)) and after.finish_reason == "length"


def test_stop_finishes_everything_cancelled():
    model = tiny_model(block_size=512)
    forward = model.forward

    def slow(*args, **kwargs):
        threading.Event().wait(0.005)
        return forward(*args, **kwargs)

    model.forward = slow
    engine = Engine(model, eos_id=None, max_batch=1).start()
    streams = [engine.submit(Request(p, greedy(400))) for p in PROMPTS[:3]]
    assert streams[0].get(timeout=TIMEOUT) is not None
    engine.stop()
    for stream in streams:
        read_all(stream, timeout=1)  # ends, without waiting
        assert stream.finish_reason == "cancelled"
    assert engine.running == 0 and engine.waiting == 0


def test_stream_get_times_out_and_end_repeats():
    stream = Stream(prompt_tokens=2)
    with pytest.raises(queue.Empty):
        stream.get(timeout=0.01)
    stream._put(5)
    stream._finish("stop")
    stream._finish("error", "ignored: the first reason stays")
    assert list(stream) == [5] and stream.get(timeout=0) is None and stream.get(timeout=0) is None
    assert (stream.finish_reason, stream.error, stream.completion_tokens) == ("stop", None, 1)


@pytest.mark.parametrize("request_, match", [
    (Request([], greedy(1)), "non-empty list"),
    (Request([1, 97], greedy(1)), r"\[0, 97\)"),
    (Request([1.5], greedy(1)), "whole numbers"),
    ("hello", "Request"),
])
def test_bad_requests_are_refused(request_, match):
    engine = Engine(tiny_model(), eos_id=None)
    with pytest.raises(CourseError, match=match):
        engine.submit(request_)
    assert engine.waiting == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_batch=0), "max_batch=0"), (dict(max_queue=1.5), "max_queue"), (dict(vocab_limit=98), "vocab_limit"),
    (dict(eos_id=97), "eos_id=97"),
])
def test_bad_engine_settings_are_refused(kwargs, match):
    with pytest.raises(CourseError, match=match):
        Engine(tiny_model(), **{"eos_id": None, **kwargs})
