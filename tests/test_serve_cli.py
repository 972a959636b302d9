"""`openllm-edu serve` and `openllm-edu chat --url` as a user runs them: a real server process on a free loopback
port, the chat command streaming replies from it, Ctrl-C stopping it; bad input is one line and exit status 2.
Every wait is bounded."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from openllm_edu.chat import ChatTokenizer, resize_embeddings, save_chat_tokenizer
from openllm_edu.model import TOKENIZER_DIR, course_model, save_pretrained

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) runs the server")
CLI = [str(Path(sys.executable).with_name("openllm-edu"))]  # the installed console script
ENV = {**os.environ, "OPENLLM_EDU_PROFILE": "ci", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    "A saved model with chapter 11's chat tokens (untrained for chat: the replies are only checked to stream)."
    model, tokenizer = course_model("ci")
    chat_tokenizer = ChatTokenizer(tokenizer)
    folder = save_pretrained(resize_embeddings(model, chat_tokenizer.vocab_size), tmp_path_factory.mktemp("chat"))
    save_chat_tokenizer(chat_tokenizer, folder / TOKENIZER_DIR)
    return folder


def run(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=120)


def test_serve_then_chat_with_it_then_ctrl_c(chat_folder):
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--checkpoint", str(chat_folder), "--port", str(port),
                               "--max-batch", "2"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer /health in 90 s"
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        model_id = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        assert model_id == chat_folder.name
        chat = run("chat", "--url", url, "--max-new-tokens", "8", "--temperature", "0",
                   stdin="Who speaks first?\n/reset\nAnd then?\n/quit\nnever sent\n")
        assert chat.returncode == 0, chat.stderr
        assert len(chat.stdout.splitlines()) >= 2 and chat.stdout.strip()  # two replies streamed back
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and f"http://127.0.0.1:{port}/" in err


def test_bad_input_is_one_line_and_exit_2(chat_folder, tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cases = [
            (["serve", "--checkpoint", str(tmp_path / "missing")], "config.json is missing"),
            (["serve", "--checkpoint", str(chat_folder), "--host", "0.0.0.0"], "api_key"),
            (["serve", "--checkpoint", str(chat_folder), "--port", str(port)], "can't be used"),
            (["serve", "--checkpoint", str(chat_folder), "--max-batch", "0"], "--max-batch 0"),
        ]
        for argv, message in cases:
            result = run(*argv)
            assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, (argv, result)
    result = run("chat", "--url", f"http://127.0.0.1:{free_port()}", stdin="hello\n")
    assert result.returncode == 2 and "no server at" in result.stderr
    result = run("chat", "--url", "http://127.0.0.1:1", "--checkpoint", str(chat_folder))
    assert result.returncode == 2 and "not allowed with" in result.stderr  # argparse: one or the other
