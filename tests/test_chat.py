"""`scratchlm chat` in a pseudo-terminal: streaming turns, commands, Ctrl-C, context overflow."""

import os
import sys
import time

import pytest
import torch
from tiny_run import make_run

from scratchlm.checkpoint import load_checkpoint, model_tensors, save_checkpoint
from scratchlm.infer.chat import Conversation
from scratchlm.infer.engine import Engine
from scratchlm.infer.sampling import SamplingParams
from scratchlm.loading import load
from scratchlm.paths import PROJECT_ROOT

pexpect = pytest.importorskip("pexpect")


def spawn(run, *args):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "scratchlm", "chat", str(run), *args],
        env=env,
        encoding="utf-8",
        timeout=60,
    )
    child.expect("> ")
    return child


def never_ending_run(folder):
    """A random model that cannot write <|end|> or <|eos|>: its answers run to their limit."""
    run = make_run(folder, max_seq_len=2048, dim=128)
    model, tokenizer = load(run)
    with torch.no_grad():  # the stop tokens' logits stay 0 while the largest other is far above
        model.output.weight.mul_(100)
        for token in (tokenizer.end_id, tokenizer.eos_id):
            model.output.weight[token] = 0
    ckpt = load_checkpoint(run / "pretrain")
    save_checkpoint(run / "pretrain", 1, model_tensors(model), ckpt.model_config, {"step": 1})
    return run


def expected_answer(run, messages, max_tokens):
    model, tokenizer = load(run)
    prompt, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, stop_token_ids=(tokenizer.end_id, tokenizer.eos_id)
    )
    return Engine(model, tokenizer).generate_batch([prompt], params)[0].text


def say(child, text: str) -> str:
    """Send a line; what the program printed before its next prompt."""
    child.sendline(text)
    child.expect_exact(text + "\r\n")
    child.expect_exact("\r\n> ")
    return child.before


def test_turns_commands_and_context_overflow(tmp_path):
    run = make_run(tmp_path / "run")
    child = spawn(run, "--temperature", "0", "--max-new-tokens", "100")
    first = expected_answer(run, [{"role": "user", "content": "Hello there"}], 100)
    assert say(child, "Hello there") == first.replace("\n", "\r\n")
    assert say(child, "/system You speak in rhymes.") == "(system prompt set)"
    assert "unknown command" in say(child, "/bogus")
    # Each exchange is ~110 tokens of a 256-token context with 100 kept for the answer: the second
    # message already pushes the first exchange out.
    assert say(child, "And then?").startswith(
        "(dropped the 2 oldest messages to fit the model's context)"
    )
    assert say(child, "/reset") == "(new conversation)"
    system = {"role": "system", "content": "You speak in rhymes."}
    with_system = expected_answer(run, [system, {"role": "user", "content": "Hello there"}], 100)
    assert say(child, "Hello there") == with_system.replace("\n", "\r\n")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(tmp_path):
    run = never_ending_run(tmp_path / "run")
    child = spawn(run, "--temperature", "0", "--max-new-tokens", "1500")
    child.sendline("Talk forever")
    child.expect("Talk forever\r\n")
    child.expect(".", timeout=30)  # the answer has begun
    child.sendintr()
    child.expect(r" \[stopped\]\r\n> ", timeout=30)
    # Python's readline loses a SIGINT that lands between drawing the prompt and waiting for
    # a key; let it reach the wait first (a busy machine can stall it there).
    time.sleep(0.5)
    child.sendintr()  # at the prompt: a reminder, not an exit
    child.expect(r"\(/quit or Ctrl-D leaves\)")
    child.sendline("Again")
    child.expect("Again\r\n")
    child.expect(".", timeout=30)
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_oldest_exchanges_go_first_and_the_system_prompt_stays(tmp_path_factory):
    tokenizer = load(make_run(tmp_path_factory.mktemp("run")))[1]
    conversation = Conversation(tokenizer, context=120, reserve=40, system="Be kind.")
    for i in range(6):
        conversation.turns += [
            {"role": "user", "content": f"question {i} " * 3},
            {"role": "assistant", "content": f"answer {i} " * 3},
        ]
    conversation.turns.append({"role": "user", "content": "last question"})
    ids, dropped = conversation.prompt()
    assert len(ids) + 40 <= 120 and dropped > 0 and dropped % 2 == 0
    assert conversation.messages()[0] == {"role": "system", "content": "Be kind."}
    assert conversation.turns[-1]["content"] == "last question"
    conversation.turns = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(Exception, match="context"):
        conversation.prompt()
