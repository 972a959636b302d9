"""Chapter 15b: the OpenAI-compatible server, in front of a stand-in engine with the batching engine's interface.

The official `openai` client is the reference for the request and response shapes; chapter 06's `generate_text` is
the reference for the text; raw HTTP reads check the Server-Sent Events framing byte for byte; a real Chromium
(driven by Playwright, never a downloaded browser) checks the chat page. Every wait is bounded in time."""
import copy
import json
import queue
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) runs the server")
openai = pytest.importorskip("openai", reason="the official openai client is the reference for the server's shapes")

from openllm_edu.batching import Engine, QueueFull  # noqa: E402
from openllm_edu.chat import ChatTokenizer, render_prompt, resize_embeddings  # noqa: E402
from openllm_edu.core import CourseError  # noqa: E402
from openllm_edu.generate import CachedLogits, GenerationConfig, generate_text, sample_tokens  # noqa: E402
from openllm_edu.model import course_model, save_pretrained  # noqa: E402
from openllm_edu.quantize import quantize_model, save_quantized  # noqa: E402
from openllm_edu.serve import (  # noqa: E402
    EngineRequest,
    ServerLimits,
    ServerThread,
    create_app,
    load_served_model,
    serve,
)

PROMPT = "ROMEO:\nBut soft, what light"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# --- a stand-in engine with the interface of chapter 15's Engine ------------------------------------------------------

class SerialStream:
    def __init__(self, prompt_tokens):
        self.tokens, self.finish_reason, self.error = queue.Queue(), None, None
        self.prompt_tokens, self.completion_tokens, self.cancelled = prompt_tokens, 0, False

    def get(self, timeout=None):
        token = self.tokens.get(timeout=timeout)
        if token is None:
            self.tokens.put(None)
        return token

    def __iter__(self):
        while (token := self.get(timeout=30)) is not None:
            yield token

    def cancel(self):
        self.cancelled = True

    def finish(self, reason, error=None):
        self.finish_reason, self.error = reason, error
        self.tokens.put(None)


class SerialEngine:
    """Chapter 06's sample_tokens (with a KV cache) for one request at a time. `token_delay` slows it down;
    `fail_after` ends every stream with an error after that many tokens; `streams` keeps every stream submitted."""
    def __init__(self, model, eos_id, vocab_limit=None, max_batch=1, max_queue=64, token_delay=0.0, fail_after=None):
        self.model, self.eos_id, self.vocab_limit, self.max_batch = model, eos_id, vocab_limit, 1
        self.max_queue, self.token_delay, self.fail_after = max_queue, token_delay, fail_after
        self.queue, self.current, self.streams = [], None, []
        self.lock, self.halt, self.thread = threading.Lock(), threading.Event(), None

    @property
    def running(self):
        return int(self.current is not None)

    @property
    def waiting(self):
        return len(self.queue)

    def submit(self, request):
        request.config.validate()
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests wait")
            ids = request.prompt_ids[-(self.model.config.block_size - 1):]
            stream = SerialStream(len(ids))
            self.queue.append((stream, ids, request.config))
            self.streams.append(stream)
        return stream

    def tokens(self, ids, config):
        cached = CachedLogits(self.model, 1, max_len=self.model.config.block_size)

        def logits_fn(idx):
            logits = cached(idx)
            if self.vocab_limit is not None:
                logits[:, self.vocab_limit:] = float("-inf")
            return logits
        room = self.model.config.block_size - len(ids)
        config = GenerationConfig(**{**vars(config), "max_new_tokens": min(config.max_new_tokens, room)})
        return (int(t) for t in sample_tokens(logits_fn, torch.tensor([ids]), config, self.eos_id))

    def step(self):
        with self.lock:
            if self.current is None and self.queue:
                stream, ids, config = self.queue.pop(0)
                self.current = stream, self.tokens(ids, config)
        if self.current is None:
            return False
        stream, tokens = self.current
        if stream.cancelled:
            stream.finish("cancelled")
        elif self.fail_after is not None and stream.completion_tokens == self.fail_after:
            stream.finish("error", "RuntimeError: the model ran out of memory")
        elif (token := next(tokens, None)) is None:
            stream.finish("length")
        else:
            time.sleep(self.token_delay)
            stream.completion_tokens += 1
            stream.tokens.put(token)
            if token == self.eos_id:
                stream.finish("stop")
        if stream.finish_reason is not None:
            self.current = None
        return True

    def start(self):
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def loop(self):
        while not self.halt.is_set():
            if not self.step():
                time.sleep(0.002)

    def stop(self):
        self.halt.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        for stream, *_ in self.queue + ([self.current] if self.current else []):
            stream.finish("cancelled")
        self.queue, self.current = [], None


# --- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain():
    return course_model("ci")


@pytest.fixture(scope="module")
def chat():
    model, tokenizer = course_model("ci")
    chat_tokenizer = ChatTokenizer(tokenizer)
    return resize_embeddings(model, chat_tokenizer.vocab_size), chat_tokenizer


@pytest.fixture
def serving(request):
    "serving(model, tokenizer, **engine and app options) -> (url, engine); everything stops when the test ends."
    running = []

    def start(model, tokenizer, api_key=None, limits=None, started=True, **engine_options):
        engine = SerialEngine(model, tokenizer.eos_id, vocab_limit=tokenizer.vocab_size, **engine_options)
        if started:
            engine.start()
        server = ServerThread(create_app(engine, tokenizer, "course", limits, api_key))
        url = server.__enter__()
        running.append((server, engine))
        return url, engine

    yield start
    for server, engine in running:
        engine.stop()
        server.stop()


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def sse_events(body: str) -> list[str]:
    "The data of each event of an SSE body, checking that every event is exactly `data: ...` and a blank line."
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), body[:500]
    return [event[len("data: "):] for event in events]


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# --- text: the openai client against chapter 06 --------------------------------------------------------------------

def test_greedy_text_is_chapter_06s(serving, plain):
    model, tokenizer = plain
    url, _ = serving(model, tokenizer)
    answer = client(url).completions.create(model="course", prompt=PROMPT, max_tokens=20, temperature=0)
    expected = generate_text(model, tokenizer, PROMPT, GenerationConfig(max_new_tokens=20, temperature=0))
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 20)
    assert answer.usage.total_tokens == prompt_tokens + 20


def test_a_seed_gives_the_same_text_streamed_or_not(serving, plain):
    model, tokenizer = plain
    url, _ = serving(model, tokenizer)
    options = dict(model="course", prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    whole = client(url).completions.create(**options).choices[0].text
    streamed = client(url).completions.create(**options, stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert len(pieces) > 2 and "".join(pieces) == whole
    config = GenerationConfig(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    assert whole == generate_text(model, tokenizer, PROMPT, config)
    other = client(url).completions.create(**{**options, "seed": 12}).choices[0].text
    assert other != whole


def test_stop_strings_end_the_text_and_cancel_the_engine(serving, plain):
    model, tokenizer = plain
    url, engine = serving(model, tokenizer)
    options = dict(model="course", prompt=PROMPT, max_tokens=30, temperature=0.9, seed=5)
    whole = client(url).completions.create(**options).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    for stream in (False, True):
        answer = client(url).completions.create(**options, stop=[stop, "never seen"], stream=stream)
        if stream:
            chunks = list(answer)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert text == whole[:whole.find(stop)] and finish == "stop"
        assert engine.streams[-1].cancelled  # the engine was told to free the slot


def test_chat_with_the_openai_client(serving, chat):
    model, tokenizer = chat
    url, _ = serving(model, tokenizer)
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who art thou?"}]
    options = dict(model="course", messages=messages, max_tokens=12, temperature=0.8, seed=3)
    reply = client(url).chat.completions.create(**options)
    chunks = list(client(url).chat.completions.create(**options, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(render_prompt(tokenizer, messages))


def test_chat_needs_chat_tokens(serving, plain):
    url, _ = serving(*plain)
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="course", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["param"] == "messages" and "chat tokens" in caught.value.body["message"]
    assert client(url).completions.create(model="course", prompt="Hi", max_tokens=2).choices[0].text is not None


# --- the wire: SSE framing, n, errors -------------------------------------------------------------------------------

def test_sse_framing_with_two_answers(serving, plain):
    url, _ = serving(*plain)
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 2, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(event) for event in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    finals = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(finals) == [0, 1]
    assert {c["id"] for c in chunks} == {usage["id"]} and all(c["object"] == "text_completion" for c in chunks)
    whole = httpx.post(url + "/v1/completions", json=body | {"stream": False}, timeout=30).json()
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index)
        assert text == whole["choices"][index]["text"]
    assert whole["choices"][0]["text"] != whole["choices"][1]["text"]  # seeds 2 and 3


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 2), ("top_p", 0), ("max_tokens", 0),
                                          ("n", 0), ("top_k", 0), ("max_tokens", 10_000), ("n", 50),
                                          ("stop", [""]), ("seed", "abc")])
def test_impossible_fields_are_400s_naming_the_field(serving, plain, field, value):
    url, _ = serving(*plain)
    response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", field: value}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and field in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_json_is_400(serving, plain):
    url, _ = serving(*plain)
    response = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_unknown_model_is_404(serving, plain):
    url, _ = serving(*plain)
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="gpt-9", prompt="Hi", max_tokens=2)
    assert [m.id for m in client(url).models.list()] == ["course"]


def test_an_engine_error_mid_stream_is_an_error_event(serving, plain):
    url, _ = serving(*plain, fail_after=3)
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=30) as response:
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert all("choices" in json.loads(event) for event in events[:-2])
    response = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 500 and "out of memory" in response.json()["error"]["message"]


def test_a_slow_request_times_out(serving, plain):
    url, _ = serving(*plain, token_delay=0.3, limits=ServerLimits(request_timeout=0.5))
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"


# --- limits: health while streaming, disconnects, a full queue, the API key ------------------------------------------

def test_health_answers_while_four_streams_run(serving, plain):
    url, engine = serving(*plain, token_delay=0.05)
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True}
    bodies = [None] * 4

    def read(k):
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            bodies[k] = response.read().decode()
    readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(4)]
    for reader in readers:
        reader.start()
    wait_until(lambda: engine.running + engine.waiting == 4)
    health = httpx.get(url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["running"] + health["waiting"] == 4
    assert not any(s.finish_reason for s in engine.streams)  # no stream had ended yet
    for reader in readers:
        reader.join(timeout=60)
    assert all(b is not None and b.endswith("data: [DONE]\n\n") for b in bodies)


def test_a_client_that_leaves_cancels_its_stream(serving, plain):
    url, engine = serving(*plain, token_delay=0.05)
    body = {"prompt": PROMPT, "max_tokens": 50, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first event arrived: generation is under way
    wait_until(lambda: engine.streams[0].finish_reason is not None)
    stream = engine.streams[0]
    assert stream.cancelled and stream.finish_reason == "cancelled" and stream.completion_tokens < 45


def test_a_full_queue_is_429(serving, plain):
    model, tokenizer = plain
    url, engine = serving(model, tokenizer, started=False, max_queue=2)  # nothing leaves the queue
    engine.submit(EngineRequest([1, 2], GenerationConfig(max_new_tokens=2)))
    with pytest.raises(openai.RateLimitError):
        client(url).completions.create(model="course", prompt="Hi", max_tokens=2, n=2)
    assert engine.streams[1].cancelled  # the answer that did get a place gave it back
    response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "stream": True}, timeout=30)
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"


def test_the_api_key(serving, plain):
    url, _ = serving(*plain, api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").completions.create(model="course", prompt="Hi", max_tokens=2)
    assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert client(url, key="sesame").completions.create(model="course", prompt="Hi", max_tokens=2).choices
    with pytest.raises(CourseError, match="api_key"):
        ServerThread(create_app(SerialEngine(*plain[:1], None), plain[1], "course"), host="0.0.0.0")


# --- a real browser ------------------------------------------------------------------------------------------------

def test_the_chat_page_streams_a_reply_in_chromium(serving, plain, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (the dev extra)")
    if not CHROMIUM.is_file() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    model, tokenizer = plain
    url, _ = serving(model, tokenizer, token_delay=0.05)
    expected = generate_text(model, tokenizer, PROMPT, GenerationConfig(max_new_tokens=12, temperature=0))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/", timeout=20_000)
            page.fill("#prompt", PROMPT)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.click("#send")
            reply = "document.querySelector('#log').lastElementChild.textContent"
            # part of the reply is on the page before the answer is done: it streamed in
            page.wait_for_function(f"() => {reply}.length > 0 && document.getElementById('status').textContent "
                                   "=== '...'", timeout=20_000)
            page.wait_for_function("() => document.getElementById('status').textContent === 'done'", timeout=20_000)
            assert page.evaluate(f"() => {reply}") == expected
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000


# --- loading what serve() serves -------------------------------------------------------------------------------------

def test_saved_models_load_with_their_chat_tokens_and_quantised(chat, plain, tmp_path):
    model, tokenizer = chat
    save_pretrained(model, tmp_path / "run" / "model", tokenizer)
    loaded, loaded_tokenizer, name = load_served_model(tmp_path / "run")  # a run folder: its model/
    assert isinstance(loaded_tokenizer, ChatTokenizer) and name == "model"
    assert loaded_tokenizer.encode_with_specials("<|user|>Hi") == tokenizer.encode_with_specials("<|user|>Hi")
    ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])])
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    quantized, plain_tokenizer = quantize_model(course_model("ci")[0], "int8"), plain[1]
    save_quantized(quantized, tmp_path / "int8", plain_tokenizer)
    loaded, loaded_tokenizer, name = load_served_model(tmp_path / "int8")
    assert name == "int8" and not isinstance(loaded_tokenizer, ChatTokenizer)
    plain_ids = torch.tensor([plain_tokenizer.encode(PROMPT)])
    assert torch.equal(loaded(plain_ids)[0], quantized(plain_ids)[0])


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(plain):
    with pytest.raises(CourseError, match="api_key"):
        serve(plain, SerialEngine, host="0.0.0.0")


# --- the real engine of chapter 15 behind the server ---------------------------------------------------------------

@pytest.fixture
def engine_server(plain):
    "The server in front of chapter 15's batching Engine (4 slots) on the ci course model."
    model, tokenizer = plain
    engine = Engine(model, tokenizer.eos_id, vocab_limit=tokenizer.vocab_size, max_batch=4).start()
    server = ServerThread(create_app(engine, tokenizer, "course"))
    url = server.__enter__()
    yield url, engine
    engine.stop()
    server.stop()


def test_concurrent_requests_through_the_batching_engine_get_chapter_06s_text(engine_server, plain):
    model, tokenizer = plain
    url, engine = engine_server
    prompts = [PROMPT, "KING:", "Where is the", PROMPT + " yonder", "O", "HAMLET:\nTo be"]  # 6 requests, 4 slots
    answers = [None] * len(prompts)

    def ask(k):
        streamed = client(url).completions.create(model="course", prompt=prompts[k], max_tokens=16, temperature=0,
                                                  stream=True)
        answers[k] = "".join(c.choices[0].text for c in streamed)
    askers = [threading.Thread(target=ask, args=(k,), daemon=True) for k in range(len(prompts))]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(timeout=60)
    config = GenerationConfig(max_new_tokens=16, temperature=0)
    assert answers == [generate_text(model, tokenizer, p, config) for p in prompts]
    seeded = dict(model="course", prompt=PROMPT, max_tokens=16, temperature=0.9, seed=4)
    assert (client(url).completions.create(**seeded).choices[0].text
            == "".join(c.choices[0].text for c in client(url).completions.create(**seeded, stream=True)))


def test_a_client_that_leaves_frees_its_batch_slot(plain, monkeypatch):
    model, tokenizer = plain
    slow = copy.deepcopy(model)
    forward = slow.forward
    monkeypatch.setattr(slow, "forward", lambda *a, **k: (time.sleep(0.1), forward(*a, **k))[1])  # 40 tokens: 4 s
    engine = Engine(slow, tokenizer.eos_id, vocab_limit=tokenizer.vocab_size, max_batch=2).start()
    try:
        with ServerThread(create_app(engine, tokenizer, "course")) as url:
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
                next(response.iter_lines())  # the first event arrived: the request holds a slot
            assert engine.running == 1
            wait_until(lambda: engine.running == 0, seconds=1.5)  # long before its 40 tokens were done
    finally:
        engine.stop()
