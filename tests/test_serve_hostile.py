"""Attacks on `scratchlm serve` that once hurt other clients: sampling settings that broke every
request in the step, prompts that stalled the event loop, clients that hung up or never finished
sending, and bad command-line flags."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import ThreadServer
from tiny_run import make_run

from scratchlm.cli import main

BODY = {"model": "tiny", "prompt": "go on", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # A long context: one request can run for seconds, long enough to hang up in the middle.
    return make_run(tmp_path_factory.mktemp("hostile") / "tiny", max_seq_len=4096)


@pytest.fixture(scope="module")
def server(run):
    s = ThreadServer(run, max_batch=1)
    yield s
    s.stop()


def health_seconds(url: str) -> float:
    start = time.perf_counter()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    return time.perf_counter() - start


def test_tiny_temperature_and_top_p_fail_nobody(server):
    """1e-39 and 1e-300 once made sampling raise, and the engine failed every request beside."""
    long = BODY | {"max_tokens": 300, "ignore_eos": True, "stream": True}
    lines = []

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line)

    streaming = threading.Thread(target=stream)
    streaming.start()
    edges = [{"temperature": 1e-39}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}]
    with ThreadPoolExecutor(3) as pool:
        replies = list(
            pool.map(
                lambda e: httpx.post(server.url + "/v1/completions", json=BODY | e, timeout=60),
                edges,
            )
        )
    streaming.join(60)
    assert [r.status_code for r in replies] == [200, 200, 200]
    greedy = httpx.post(server.url + "/v1/completions", json=BODY, timeout=60).json()
    assert replies[0].json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)


def test_every_prompt_form_is_bounded(server):
    url = server.url + "/v1/completions"
    for prompt, what in [
        (["a" * 4_000_000], "characters"),
        (["a" * 600_000, "b" * 600_000], "1,200,000 prompt characters"),
        ([[1] * 600_000, [1] * 600_000], "1,200,000 prompt token ids"),
        ([1] * 1_000_001, "prompt"),
    ]:
        start = time.perf_counter()
        r = httpx.post(url, json={"model": "tiny", "prompt": prompt}, timeout=60)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
        assert time.perf_counter() - start < 5
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 600_000}] * 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "1,200,000 characters of message content" in r.text


def test_health_answers_while_big_requests_are_tokenized_and_refused(server):
    """Tokenizing 1 MB on the event loop once held /health for seconds."""
    text = "Before we proceed any further, hear me speak. " * 21_000  # 966,000 characters
    big = [
        ("/tokenize", {"prompt": text}),
        ("/tokenize", {"prompt": text}),
        ("/v1/completions", {"model": "tiny", "prompt": ["a" * 4_000_000]}),
    ]
    with ThreadPoolExecutor(len(big)) as pool:
        pending = [pool.submit(httpx.post, server.url + p, json=b, timeout=120) for p, b in big]
        time.sleep(0.3)
        waits = []
        while not all(f.done() for f in pending):
            waits.append(health_seconds(server.url))
            time.sleep(0.05)
        statuses = [f.result().status_code for f in pending]
    assert statuses == [200, 200, 400]
    assert len(waits) >= 3 and max(waits) < 1.5, waits


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(server):
    """With one batch slot, a client that waited for 4,000 tokens and left held it to the end."""
    body = json.dumps(BODY | {"max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
    hung_up = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json=BODY, timeout=60)
    assert r.status_code == 200
    assert time.monotonic() - hung_up < 3.0


def test_half_sent_requests_are_closed(run):
    """Connections that stop inside their headers or body were held open forever."""
    server = ThreadServer(run, header_timeout=1.0, body_timeout=1.0)
    half_headers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    half_bodies = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    for s in half_headers:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    for s in half_bodies:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
    try:
        for s in half_headers + half_bodies:
            s.settimeout(10)
        for s in half_headers:
            assert s.recv(4096) == b""  # closed, nothing said: no request was ever read
        for s in half_bodies:
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
            assert b"did not arrive" in reply
        assert httpx.post(server.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
    finally:
        for s in half_headers + half_bodies:
            s.close()
        server.stop()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--cache-tokens", "-5"], "--cache-tokens must be at least 1"),
        (["--cache-tokens", "100"], "at least one full context"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--drain-seconds", "-1"], "--drain-seconds"),
        (["--drain-seconds", "nan"], "--drain-seconds"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device = 'cuda"),
        (["--device", "banana"], "expected auto, cpu"),
        (["--device", "meta"], "expected auto, cpu"),
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(run, capsys, flags, fragment):
    assert main(["serve", str(run), "--port", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "inf"], "temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--seed", str(2**70)], "seed"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device"),
    ],
)
def test_bad_generate_flags_are_one_line_and_exit_2(run, capsys, flags, fragment):
    assert main(["generate", str(run), "--prompt", "hi", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the prompt is printed
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


@pytest.mark.parametrize("temperature", ["1e-40", "1e-300", "0"])
def test_generate_with_a_tiny_temperature_is_greedy(run, capsys, temperature):
    args = ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "6", "--top-p", "1e-300"]
    assert main([*args, "--temperature", temperature]) == 0
    out = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == out and out.startswith("hi")


def test_chat_on_a_missing_device_is_one_line_and_exit_2(run, capsys):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["chat", str(run), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --device = 'cuda"), err
