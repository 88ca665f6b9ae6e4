"""`scratchlm serve` through real clients: the openai package, lm-evaluation-harness, a headless
Chromium, hostile requests and 32 concurrent streams, against one server process."""

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import Server
from tiny_run import make_run

from scratchlm.loading import load

openai = pytest.importorskip("openai")
KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-batch", "32", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(run):
    return load(run)


def chat_text(client, content: str, max_tokens: int = 24) -> str:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return r.choices[0].message.content


def test_openai_client_chat(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0,
        max_tokens=12,
    )
    prompt, _ = tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    )
    ids, stops = list(prompt), (tokenizer.end_id, tokenizer.eos_id)
    with torch.no_grad():
        while len(ids) < len(prompt) + 12 and (len(ids) == len(prompt) or ids[-1] not in stops):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = tokenizer.decode(ids[len(prompt) :], skip_special=True)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ids) - len(prompt)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_client_streaming_chat(client):
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        temperature=0,
        max_tokens=200,
        extra_body={"ignore_eos": True},  # long enough that it surely comes in several chunks
    )
    stream = client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["length"] and usage is not None and usage.completion_tokens == 200
    assert "".join(pieces) == client.chat.completions.create(**request).choices[0].message.content
    assert len([p for p in pieces if p]) > 1


def test_openai_client_completions_with_logprobs(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "First Citizen: Before we proceed any further, hear me speak."
    r = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    choice = r.choices[0]
    ids = tokenizer.encode(text, add_bos=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert choice.text == text and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(choice.logprobs.top_logprobs[1]) == 3
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=5, logprobs=1, seed=3, n=2)
    assert len(r.choices) == 2 and all(len(c.logprobs.token_logprobs) == 5 for c in r.choices)
    stop = client.completions.create(model=MODEL, prompt=text, max_tokens=20, temperature=0)
    cut = stop.choices[0].text[2:4]
    r = client.completions.create(
        model=MODEL, prompt=text, max_tokens=20, temperature=0, stop=[cut]
    )
    assert r.choices[0].text == stop.choices[0].text[: stop.choices[0].text.find(cut)]
    assert r.choices[0].finish_reason == "stop"


def test_lm_eval_local_completions_matches_in_house_scoring(server, model_and_tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    os.environ["OPENAI_API_KEY"] = KEY
    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=MODEL, auth_token=KEY, max_retries=1
    )
    pairs = [
        ("First Citizen:", " Before we proceed"),
        ("All: Speak,", " speak."),
        ("You are all resolved rather to die", " than to famish?"),
    ]
    requests = [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    model, tokenizer = model_and_tokenizer
    for (context, continuation), (logprob, _) in zip(pairs, results, strict=True):
        whole = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole]))[0], -1)
        targets = torch.tensor(whole[n_context:])
        expected = logp[n_context - 1 : -1].gather(1, targets[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)


def test_chat_page_in_headless_chromium(server, client, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (`.ci/run` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))

    def say(text: str, max_tokens: int) -> None:
        done = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done, .msg.error.done"))
        driver.execute_script(f"document.getElementById('max-tokens').value = '{max_tokens}';")
        box = driver.find_element(By.ID, "input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        WebDriverWait(driver, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.done")) > done
        )

    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.execute_script(
            "const t = document.getElementById('temperature');"
            "t.value = '0'; t.dispatchEvent(new Event('input'));"
        )
        say("Hello there", 20)
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant.done")
        assert "model: tiny (context 256 tokens)" in driver.find_element(By.ID, "model").text
        assert driver.find_element(By.ID, "temperature-value").text == "0"
        assert answer.get_attribute("data-finish") in ("stop", "length")
        assert answer.get_attribute("textContent") == chat_text(client, "Hello there", 20)
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
        # The page's default of 200 tokens: the conversation soon outgrows the 256-token context,
        # and the oldest exchanges make way (a request for more than fits was once refused).
        say("Tell me more", 200)
        say("And then?", 200)
        say("Go on", 200)
        finishes = [
            a.get_attribute("data-finish")
            for a in driver.find_elements(By.CSS_SELECTOR, ".msg.done")
        ]
        assert finishes and all(f in ("stop", "length") for f in finishes), finishes
        assert len(finishes) == 4 and not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert driver.find_elements(By.CSS_SELECTOR, ".note.dropped")
        driver.save_screenshot(str(tmp_path / "chat-page-1280.png"))

        # A phone's width: the settings fold away, the message box and the buttons fit.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        driver.get(server.url + "/")
        assert driver.execute_script("return window.innerWidth") == 390
        assert driver.find_element(By.ID, "settings").get_attribute("open") is None
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        say("Hi from a phone", 20)
        phone_answer = driver.find_element(By.CSS_SELECTOR, ".msg.done")
        assert phone_answer.get_attribute("data-finish") in ("stop", "length")
        box = driver.find_element(By.ID, "input").rect
        assert box["width"] > 250, box
        for button in ("send", "stop"):
            rect = driver.find_element(By.ID, button).rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= 390, (button, rect)
            assert rect["y"] + rect["height"] <= 844, (button, rect)
        driver.save_screenshot(str(tmp_path / "chat-page-390.png"))
        assert all((tmp_path / f"chat-page-{w}.png").stat().st_size > 1000 for w in (1280, 390))
    finally:
        driver.quit()


def hostile_requests(url: str) -> list[dict]:
    """1,000 malformed or hostile requests (each a dict of httpx.request arguments)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    chat, comp = url + "/v1/chat/completions", url + "/v1/completions"
    ok_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    variants = [
        {"content": b"{not json"},
        {"content": b"\xff\xfe\xfa invalid utf-8"},
        {"content": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3\x28"}]}'},
        {"content": b"[" * 100_000 + b"]" * 100_000},
        {"content": b""},
        {"content": b"[1, 2, 3]"},
        {"content": b"null"},
        {"json": ok_chat | {"max_tokens": -1}},
        {"json": ok_chat | {"max_tokens": 10**12}},
        {"json": ok_chat | {"max_tokens": 1.5}},
        {"json": ok_chat | {"max_tokens": "10"}},
        {"json": ok_chat | {"temperature": -3}},
        {"json": ok_chat | {"temperature": "hot"}},
        {"content": json.dumps(ok_chat)[:-1].encode() + b', "temperature": NaN}'},
        {"content": json.dumps(ok_chat)[:-1].encode() + b', "top_p": Infinity}'},
        {"json": ok_chat | {"top_p": 0}},
        {"json": ok_chat | {"n": 0}},
        {"json": ok_chat | {"n": 10**6}},
        {"json": ok_chat | {"seed": -5}},
        {"json": ok_chat | {"seed": 2**80}},
        {"json": ok_chat | {"stop": ["a"] * 50}},
        {"json": ok_chat | {"stop": 7}},
        {"json": ok_chat | {"unknown_field": 1}},
        {"json": ok_chat | {"logit_bias": {"1": 5}}},
        {"json": ok_chat | {"model": "gpt-4"}},
        {"json": ok_chat | {"messages": []}},
        {"json": ok_chat | {"messages": [{"role": "wizard", "content": "hi"}]}},
        {"json": ok_chat | {"messages": [{"role": "user", "content": 5}]}},
        {"json": ok_chat | {"messages": "hi"}},
        {"json": ok_chat | {"messages": [{"role": "user", "content": "x " * 5000}]}},
        {"json": ok_chat | {"stream": "yes"}},
        {"json": ok_chat | {"presence_penalty": 1.0}},
        {"json": {"model": MODEL}},
        {"json": ok_chat, "headers": {"Authorization": "Bearer wrong"}},
        {"json": ok_chat, "headers": {}},
        {"json": ok_chat, "headers": {"Authorization": KEY}},
        {"content": b"x" * (5 << 20)},
        {"url": comp, "json": {"model": MODEL, "prompt": [10**9]}},
        {"url": comp, "json": {"model": MODEL, "prompt": [-1, 2]}},
        {"url": comp, "json": {"model": MODEL, "prompt": []}},
        {"url": comp, "json": {"model": MODEL, "prompt": [[]]}},
        {"url": comp, "json": {"model": MODEL, "prompt": [1.5]}},
        {"url": comp, "json": {"model": MODEL, "prompt": "hi", "logprobs": 99}},
        {"url": comp, "json": {"model": MODEL, "prompt": "hi", "max_tokens": 300}},
        {"url": comp, "json": {"model": MODEL, "prompt": [1] * 300, "max_tokens": 0}},
        {"url": comp, "json": {"model": MODEL, "prompt": {"a": 1}}},
        {"url": comp, "json": {"model": MODEL, "prompt": "hi", "echo": "true"}},
        {"url": url + "/v1/nothing", "json": ok_chat},
        {"url": url + "/detokenize", "json": {"tokens": [10**8]}},
        {"url": url + "/tokenize", "json": {"prompt": 5}},
        {"method": "GET", "url": chat},
        {"method": "DELETE", "url": url + "/v1/models"},
        {"method": "GET", "url": url + "/../../etc/passwd"},
        {"method": "GET", "url": url + "/static/../app.py"},
    ]
    out = []
    for i in range(1000):
        v = dict(variants[i % len(variants)])
        if v.get("content") is not None and len(v["content"]) > 100_000 and i >= len(variants):
            v = {"content": b"{" * (i % 50 + 1)}  # big bodies once each, then small junk
        headers = v.pop("headers", auth)
        out.append(
            {"method": v.pop("method", "POST"), "url": v.pop("url", chat), "headers": headers} | v
        )
    return out


def test_hostile_requests_get_4xx_and_the_server_lives(server, client):
    statuses = []
    with httpx.Client(timeout=30) as http:
        for request in hostile_requests(server.url):
            response = http.request(**request)
            statuses.append(response.status_code)
            if response.headers.get("content-type", "").startswith("application/json"):
                assert "error" in response.json(), request
    assert len(statuses) == 1000
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert {400, 401, 404, 405, 413} <= set(statuses)
    # Lone surrogates are valid JSON escapes but not text: a clean 400, or read as U+FFFD.
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for route, body in [
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        ),
        (
            "/v1/completions",
            '{"model": "tiny", "prompt": "\\udfff", "echo": true, "max_tokens": 1}',
        ),
        ("/tokenize", '{"prompt": "\\udfff x"}'),
    ]:
        status = httpx.post(server.url + route, content=body, headers=auth).status_code
        assert status in (200, 400), (route, status)
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=long_chat, headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert chat_text(client, "still there?", 4) is not None
    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'scratchlm_requests_total{route="/v1/chat/completions",status="400"}' in metrics
    assert "scratchlm_time_to_first_token_seconds_count" in metrics


def stream_chat(url: str, content: str, max_tokens: int) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    text, done = [], False
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
    assert done
    return "".join(text)


def test_32_concurrent_streams_each_get_their_text_alone(server, client):
    prompts = [f"Question number {i}: what {'is' if i % 2 else 'was'} it?" for i in range(32)]
    alone = [chat_text(client, p, 20 + i % 7) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(32) as pool:
        together = list(
            pool.map(
                lambda a: stream_chat(server.url, *a),
                [(p, 20 + i % 7) for i, p in enumerate(prompts)],
            )
        )
    assert together == alone


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 250, "stream": True, "seed": 1}
    url = server.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=server.headers) as r:
        next(r.iter_lines())  # the first piece of text, then hang up
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'scratchlm_generations_total{finish_reason="abort"} 1' in metrics


def test_full_queue_is_429_and_sigterm_drains(run):
    server = Server(run, "--max-batch", "1", "--max-queue", "1", "--drain-seconds", "60")
    try:
        body = {"model": MODEL, "prompt": "once", "max_tokens": 200, "temperature": 0}

        def post(_):
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(r.status_code for r in pool.map(post, range(6)))
        assert 429 in statuses and 200 in statuses
        assert set(statuses) == {200, 429}
        assert post(0).status_code == 200

        lines = []
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=120
        ) as r:
            iterator = r.iter_lines()
            lines.append(next(iterator))
            server.process.send_signal(signal.SIGTERM)
            lines += [line for line in iterator if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once drained, so the process ends by SIGTERM as asked.
        assert server.process.wait(timeout=60) == -signal.SIGTERM
    finally:
        server.stop()
