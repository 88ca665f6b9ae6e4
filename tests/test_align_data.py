"""Chat and preference data: every public layout, bad records set aside with their reason, the
validation split, and the length rule."""

import gzip
import json

import pytest

from scratchlm.align.batches import fit_chat, fit_pair
from scratchlm.align.data import (
    prompt_of,
    read_chat,
    read_preferences,
    read_prompts,
    split_validation,
    write_rejects,
)
from scratchlm.align.formats import BadRecord
from scratchlm.errors import UserError
from scratchlm.tokenizer import train_tokenizer

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_layouts_alpaca_sharegpt_messages_and_preference(tmp_path):
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief."},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"messages": [msg(U, "q"), msg(A, "a"), msg(U, "q2"), msg(A, "a2")], "id": 7},
        {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
    ]
    # A JSON array in a gzip file reads the same as JSON Lines.
    path = tmp_path / "chat.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(records, f)
    chat = read_chat([path])
    assert chat.rejects == []
    assert [r["messages"] for r in chat.records] == [
        [msg(U, "Add 2 and 3."), msg(A, "5")],
        [msg(S, "Be brief."), msg(U, "Translate.\n\nchat"), msg(A, "cat")],
        [msg(U, "hi"), msg(A, "hello")],
        [msg(U, "q"), msg(A, "a"), msg(U, "q2"), msg(A, "a2")],
        [msg(U, "Say yes."), msg(A, "yes")],  # a preference record gives its chosen chat
    ]
    assert chat.sources[2] == f"{path}:3"


def test_preference_layouts_hh_rlhf_rasbt_llamafactory_and_native(tmp_path):
    hh = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: "
        "An apple.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\n"
        "Assistant: No.",
    }
    rasbt = {"instruction": "Fix: He go.", "input": "", "output": "x", "chosen": "He goes.",
             "rejected": "Wrong, fool: He goes."}  # fmt: skip
    llamafactory = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
        ],
        "chosen": {"from": "gpt", "value": "Hello, friend."},
        "rejected": {"from": "gpt", "value": "What?"},
    }
    native = {"prompt": [msg(U, "2+2?")], "chosen": [msg(A, "4")], "rejected": [msg(A, "5")],
              "margin": 2}  # fmt: skip
    prefs = read_preferences([write_jsonl(tmp_path / "p.jsonl", [hh, rasbt, llamafactory, native])])
    assert prefs.rejects == []
    first, second, third, fourth = prefs.records
    assert first == {
        "prompt": [msg(U, "Hi there"), msg(A, "Hello!"), msg(U, "Name a fruit.")],
        "chosen": [msg(A, "An apple.")],
        "rejected": [msg(A, "No.")],
    }
    assert second["prompt"] == [msg(U, "Fix: He go.")] and second["chosen"] == [msg(A, "He goes.")]
    assert third["prompt"] == [msg(S, "Be kind."), msg(U, "Hi")]
    assert third["rejected"] == [msg(A, "What?")]
    assert fourth["margin"] == 2.0


def test_bad_records_are_set_aside_with_their_reason(tmp_path):
    records = [
        {"messages": [msg("robot", "beep"), msg(A, "a")]},
        {"messages": [msg(U, "q"), msg(A, "   ")]},
        {"messages": [msg(U, "only a question")]},
        {"conversations": [{"from": "function_call", "value": "f()"}]},
        {"text": "no layout at all"},
        {"messages": [msg(U, "fine"), msg(A, "good")]},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", records, raw_lines=['{"messages": [', "[1, 2"])
    chat = read_chat([path])
    assert len(chat.records) == 1
    reasons = [r.reason for r in chat.rejects]
    assert reasons[:5] == [
        "unknown role 'robot'",
        "empty assistant turn",
        "no assistant turn",
        "unknown role 'function_call'",
        "unrecognised chat layout",
    ]
    assert all(r.startswith("malformed JSON") for r in reasons[5:]) and len(reasons) == 7
    assert chat.reject_counts()["malformed JSON"] == 2
    assert "7 set aside" in chat.describe()
    audit = write_rejects(chat.rejects, tmp_path / "audit")
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert rows[0]["source"] == f"{path}:1" and rows[0]["record"] == records[0]

    bad_pairs = [
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
        {"prompt": [msg(A, "hi")], "chosen": "a", "rejected": "b"},
        {"messages": [msg(U, "q"), msg(A, "a")]},
    ]
    prefs = read_preferences([write_jsonl(tmp_path / "p.jsonl", bad_pairs)])
    assert prefs.records == []
    assert [r.reason for r in prefs.rejects] == [
        "chosen and rejected are the same",
        "empty assistant turn",
        "prompt ends with an assistant turn",
        "not a preference record: needs chosen and rejected",
    ]
    with pytest.raises(UserError, match="data file not found"):
        read_chat([tmp_path / "missing.jsonl"])


def test_prompts_come_from_chats_and_pairs(tmp_path):
    chat = [msg(S, "s"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2"), msg(A, "a2")]
    assert prompt_of(chat) == chat[:4]
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": chat},
            {"prompt": "p?", "chosen": "a", "rejected": "b"},
            {"messages": [msg(A, "no prompt")]},
        ],  # fmt: skip
    )
    prompts = read_prompts([path])
    assert [r["prompt"] for r in prompts.records] == [chat[:4], [msg(U, "p?")]]
    assert [r.reason for r in prompts.rejects] == ["no prompt before the assistant turn"]


def test_validation_split_is_fixed_by_the_prompt_and_nested():
    records = [{"messages": [msg(U, f"question {i}"), msg(A, "answer")]} for i in range(2000)]
    train, val = split_validation(records, 0.1)
    assert len(train) + len(val) == 2000 and 150 < len(val) < 250
    # Another order, or another answer to the same prompt, lands on the same side.
    _, val_again = split_validation(list(reversed(records)), 0.1)
    assert sorted(map(str, val_again)) == sorted(map(str, val))
    other_answers = [{"messages": [*r["messages"][:1], msg(A, "other")]} for r in val]
    assert split_validation(other_answers, 0.1)[0] == []
    # A smaller fraction holds out a subset of a larger one's validation set.
    _, val_small = split_validation(records, 0.05)
    assert {str(r) for r in val_small} <= {str(r) for r in val}
    with pytest.raises(UserError):
        split_validation(records, 1.0)


def test_length_rule_drops_oldest_exchanges_then_sets_aside(tmp_path):
    tokenizer = train_tokenizer(["short words for a tiny tokenizer"] * 20, 300, tmp_path / "t.json")
    long_turns = [msg(S, "sys"), msg(U, "q " * 30), msg(A, "a " * 30), msg(U, "last"),
                  msg(A, "end")]  # fmt: skip
    ids, mask = fit_chat(tokenizer, long_turns, 40, "drop_oldest_turns")
    assert (
        tokenizer.decode(ids)
        == "<|bos|><|system|>sys<|end|><|user|>last<|end|><|assistant|>end<|end|>"
    )
    assert sum(mask) == len(tokenizer.encode("end")) + 1
    with pytest.raises(BadRecord, match="longer than max_seq_len"):
        fit_chat(tokenizer, long_turns, 40, "none")
    with pytest.raises(BadRecord, match="longer than max_seq_len"):
        fit_chat(tokenizer, [msg(U, "q"), msg(A, "word " * 50)], 40, "drop_oldest_turns")

    pair = {"prompt": long_turns[1:4], "chosen": [msg(A, "yes")], "rejected": [msg(A, "no")]}
    encoded = fit_pair(tokenizer, pair, 30, "drop_oldest_turns")
    assert tokenizer.decode(encoded.chosen[: encoded.prompt_len]) == "<|bos|><|user|>last<|end|>"
    assert tokenizer.decode(encoded.rejected[encoded.prompt_len :]) == "<|assistant|>no<|end|>"
    with pytest.raises(BadRecord):
        fit_pair(tokenizer, pair, 30, "none")


def test_damaged_lines_are_set_aside_and_the_rest_read(tmp_path):
    """A record nested 100,000 levels deep (RecursionError before), a byte order mark (the first
    record was malformed JSON), U+2028 inside a string (str.splitlines cut the record in two),
    an unhashable ShareGPT speaker (TypeError), a non-finite or overflowing margin and a lone
    surrogate escape (UnicodeEncodeError writing rejected.jsonl)."""
    chat = {"messages": [{"role": "user", "content": "hi\u2028there"}, {"role": "assistant",
            "content": "hello"}]}  # fmt: skip
    lines = [
        "\ufeff" + json.dumps(chat, ensure_ascii=False),
        "[" * 100_000 + "]" * 100_000,
        '{"messages": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
        json.dumps({"conversations": [{"from": ["gpt"], "value": "x"}]}),
        json.dumps(chat, ensure_ascii=False),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = read_chat([path])
    assert [r["messages"][0]["content"] for r in dataset.records] == ["hi\u2028there"] * 2
    assert [(r.source, r.reason) for r in dataset.rejects] == [
        (f"{path}:2", "JSON nested too deeply (nested more than 100 levels)"),
        (f"{path}:3", "JSON nested too deeply (nested more than 100 levels)"),
        (f"{path}:4", "unknown role ['gpt']"),
    ]
    pairs = tmp_path / "pairs.jsonl"
    pair = '{"prompt": "q", "chosen": "a", "rejected": "b\\ud800", "margin": MARGIN}'
    pairs.write_text(
        "".join(pair.replace("MARGIN", m) + "\n" for m in ["1e400", "9" * 400, "1e39", "2"])
    )
    dataset = read_preferences([pairs])
    assert [r.reason for r in dataset.rejects] == [
        "margin must be a finite number, got inf",
        "margin must be a finite number, got " + "9" * 20,
        "margin must be a finite number, got 1e+39",
    ]
    assert dataset.records[0]["rejected"][0]["content"] == "b\ufffd"
    written = write_rejects(dataset.rejects, tmp_path / "audit")
    assert len(written.read_text(encoding="utf-8").splitlines()) == 3


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".json.gz"])
def test_a_file_cut_short_keeps_its_records_and_says_so(tmp_path, suffix):
    import zstandard

    chats = [
        json.dumps({"messages": [{"role": "user", "content": f"hi {i}, {i * i}"},
                                 {"role": "assistant", "content": f"yo {i**3}"}]})
        for i in range(2000)
    ]  # fmt: skip
    data = ("".join(c + "\n" for c in chats)).encode()
    if suffix.endswith(".json.gz"):
        data = ("[" + ",\n".join(chats) + "]").encode()
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.compress(data)
    path = tmp_path / f"chat{suffix}"
    path.write_bytes(packed[: len(packed) * 3 // 4])
    dataset = read_chat([path])
    assert dataset.rejects[-1].reason.startswith("truncated or corrupt file: ")
    if suffix != ".json.gz":  # a cut JSON array is read as lines, each a piece of the array
        assert 0 < len(dataset.records) < 2000
