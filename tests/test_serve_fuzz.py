"""Random request bodies for /v1/completions and /v1/chat/completions, drawn by hypothesis from
OpenAI's schema with every field's type and range pushed to its edges, sent to the app in-process:
never a 5xx, always OpenAI-shaped JSON, and the server still answers a plain request afterwards."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tiny_run import make_run

from scratchlm.infer.engine import Engine
from scratchlm.infer.runner import EngineThread
from scratchlm.loading import load
from scratchlm.serve.app import create_app

MAX_EXAMPLES = 600
EDGE_NUMBERS = [0, -0.0, 5e-324, 1e-300, 1e-39, 1e-5, 0.5, 1, 2, 2.0000001, 1e308, -1e308, -1]
EDGE_INTS = [0, 1, -1, 16, 17, 255, 256, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30)]

anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=6,
)
numbers = st.sampled_from(EDGE_NUMBERS) | st.floats(-3, 3) | st.integers(-3, 300)
small_ints = st.sampled_from(EDGE_INTS) | st.integers(-2, 20)
texts = st.text(max_size=40) | st.sampled_from(["", "\ud800", "<|end|>", "<|eos|>x", "é" * 30])
token_ids = st.integers(-2, 400) | st.sampled_from([2**31, 2**63, -(2**63)])


def sometimes(strategy):
    """The field's own kind of value mostly, anything at all now and then."""
    return st.one_of(strategy, strategy, strategy, anything)


prompts = st.one_of(
    texts,
    st.lists(texts, max_size=4),
    st.lists(token_ids, max_size=12),
    st.lists(st.lists(token_ids, max_size=6), max_size=3),
    st.sampled_from([[], [[]], [""], [1, "a"], [[1], "a"], [[[1]]], {"a": 1}, None, 5]),
)
sampling = {
    "max_tokens": sometimes(st.integers(0, 6) | small_ints),
    "temperature": sometimes(numbers),
    "top_p": sometimes(numbers),
    "top_k": sometimes(small_ints),
    "n": sometimes(st.integers(1, 3) | small_ints),
    "stop": sometimes(st.none() | texts | st.lists(texts, max_size=5)),
    "seed": sometimes(small_ints),
    "stream": sometimes(st.booleans()),
    "stream_options": sometimes(st.fixed_dictionaries({}, optional={"include_usage": anything})),
    "user": sometimes(texts),
    "presence_penalty": sometimes(numbers),
    "frequency_penalty": sometimes(numbers),
    "ignore_eos": sometimes(st.booleans()),
}
model_names = st.sampled_from(["tiny"] * 8 + ["gpt-4", ""]) | anything
completions = st.fixed_dictionaries(
    {"model": model_names, "prompt": prompts},
    optional=sampling
    | {
        "echo": sometimes(st.booleans()),
        "logprobs": sometimes(st.none() | small_ints),
        "surprise": anything,
    },
)
parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | anything, "text": texts}
    ),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"] * 3 + ["tool", "wizard", ""])
            | anything,
            "content": st.one_of(texts, texts, parts, anything),
        },
        optional={"name": sometimes(texts)},
    ),
    max_size=4,
)
chats = st.fixed_dictionaries(
    {"model": model_names, "messages": sometimes(messages)},
    optional=sampling
    | {
        "max_completion_tokens": sometimes(small_ints),
        "logprobs": sometimes(st.booleans()),
        "top_logprobs": sometimes(small_ints),
        "surprise": anything,
    },
)
# Bodies within the schema, so that the engine runs too (at the edges of every range).
TINY_FLOATS = [0, -0.0, 5e-324, 1e-300, 1e-39, 1e-5]
valid_sampling = {
    "max_tokens": st.integers(0, 6),
    "temperature": st.sampled_from([*TINY_FLOATS, 2]) | st.floats(0, 2),
    "top_p": st.sampled_from([5e-324, 1e-300, 1e-39, 1]) | st.floats(1e-9, 1),
    "top_k": st.sampled_from([-1, 0, 1, 10**6]) | st.integers(-1, 400),
    "n": st.integers(1, 3),
    "stop": st.none() | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.sampled_from([0, 2**63 - 1]) | st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}
valid_ids = st.lists(st.integers(0, 319), min_size=1, max_size=12)
valid_completions = st.fixed_dictionaries(
    {
        "model": st.just("tiny"),
        "prompt": st.one_of(
            texts,
            valid_ids,
            st.lists(texts, min_size=1, max_size=3),
            st.lists(valid_ids, min_size=1, max_size=3),
        ),
    },
    optional=valid_sampling | {"echo": st.booleans()},
)
valid_chats = st.fixed_dictionaries(
    {
        "model": st.just("tiny"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional=valid_sampling
    | {
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "max_tokens": st.integers(1, 6),
    },
)
bodies = st.one_of(
    st.tuples(st.just("/v1/completions"), completions),
    st.tuples(st.just("/v1/chat/completions"), chats),
    st.tuples(st.just("/v1/completions"), valid_completions),
    st.tuples(st.just("/v1/chat/completions"), valid_chats),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("fuzz") / "tiny", max_seq_len=64)
    model, tokenizer = load(run)
    app = create_app(EngineThread(Engine(model, tokenizer, max_batch=8)), tokenizer, "tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check_reply(route: str, body: dict, status: int, text: str) -> None:
    assert status < 500, (status, text, body)
    if status != 200:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], text
        return
    if body.get("stream"):
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c and "choices" in c for c in chunks), text
        return
    reply = json.loads(text)
    assert reply["object"] == (
        "text_completion" if route == "/v1/completions" else "chat.completion"
    )
    assert len(reply["choices"]) >= body.get("n", 1)
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    assert reply["usage"]["total_tokens"] >= reply["usage"]["completion_tokens"] >= 0


def test_fuzzed_bodies_get_no_5xx_and_openai_shaped_replies(client, capsys):
    tried = {"/v1/completions": 0, "/v1/chat/completions": 0, 200: 0}

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bodies)
    def one(route_and_body):
        route, body = route_and_body
        r = client.post(route, content=json.dumps(body, allow_nan=False))
        check_reply(route, body, r.status_code, r.text)
        tried[route] += 1
        tried[200] += r.status_code == 200

    one()
    plain = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert client.post("/v1/chat/completions", json=plain).status_code == 200
    assert client.get("/health").json()["running"] == 0
    total = tried["/v1/completions"] + tried["/v1/chat/completions"]
    assert total == MAX_EXAMPLES
    with capsys.disabled():
        print(
            f"\nfuzz: {total} bodies ({tried['/v1/completions']} completions, "
            f"{tried['/v1/chat/completions']} chat), {tried[200]} answered 200"
        )
