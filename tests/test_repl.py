"""The interactive REPL, driven through a real pseudo-terminal as a user would."""

from __future__ import annotations

import os
import sys

import pytest
from support import require

pexpect = require("pexpect")

PROMPT = "\r\n> "


def spawn_repl(model_dir, state_dir, *extra: str):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "opswitch", "generate", "--model", str(model_dir), "--interactive",
         "--temperature", "0", "--max-tokens", "5", "--stop-token", "-1", *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(state_dir), "TERM": "dumb"},
        encoding="utf-8", timeout=60, dimensions=(40, 200),
    )
    child.expect("Interactive mode")
    child.expect("> ")
    return child


@pytest.fixture
def repl(tiny_model_dir, tmp_path):
    child = spawn_repl(tiny_model_dir, tmp_path)
    yield child
    child.close(force=True)


def send(child, line: str, expect: str) -> str:
    child.sendline(line)
    child.expect(expect)
    return child.before


def test_slash_commands_change_settings_and_bad_ones_keep_them(repl):
    send(repl, "/temp 0.5", "Temperature set to 0.5")
    send(repl, "/topk 7", "Top-k set to 7")
    send(repl, "/topp 0.75", "Top-p set to 0.75")
    send(repl, "/tokens 3", "Max tokens set to 3")
    send(repl, "/seed 11", "Seed set to 11")
    send(repl, "/temp -2", "error: temperature must be")
    send(repl, "/topp 7", "error: top_p must be between 0 and 1")
    send(repl, "/tokens many", "error: /tokens needs an integer")
    send(repl, "/warp 9", "error: unknown command /warp")
    send(repl, "/config", "Backend: ")
    config = repl.before
    expected = ("Temperature: 0.50", "Top-k:       7", "Top-p:       0.75", "Max tokens:  3",
                "Seed:        11")
    for line in expected:
        assert line in config, config
    send(repl, "/help", "/backend B")


def test_prompts_generate_and_backend_switches_without_reloading(repl):
    send(repl, "Hello there", "Generated 5 tokens")
    repl.expect("> ")
    send(repl, "/backend naive", "Backend: naive")
    send(repl, "/backend nope", "error: unknown backend 'nope'")
    send(repl, "/config", "Backend:     naive")  # a failed switch keeps the model where it was
    send(repl, "Hello there", "Generated 5 tokens")
    repl.sendline("quit")
    repl.expect("Goodbye!")
    repl.expect(pexpect.EOF)
    repl.wait()
    assert repl.exitstatus == 0


def test_ctrl_c_interrupts_generation_not_the_session(long_context_model_dir, tmp_path):
    # no KV cache and a 4096-token context: generation lasts long enough to interrupt
    repl = spawn_repl(long_context_model_dir, tmp_path, "--no-kv-cache", "--backend", "naive")
    send(repl, "/tokens 100000", "Max tokens set to 100000")
    repl.sendline("Once upon a time")
    repl.expect("Encoded to")
    repl.expect("Once upon a time")  # text is streaming
    repl.sendintr()
    repl.expect("interrupted")
    repl.expect("> ")
    send(repl, "/tokens 2", "Max tokens set to 2")
    send(repl, "again", "Generated 2 tokens")
    repl.close(force=True)


def test_end_of_input_says_goodbye(repl):
    repl.sendeof()
    repl.expect("Goodbye!")
    repl.expect(pexpect.EOF)
    repl.wait()
    assert repl.exitstatus == 0


def test_exit_and_history_file(repl, tmp_path):
    send(repl, "/temp 0.3", "Temperature set to 0.3")
    repl.sendline("exit")
    repl.expect("Goodbye!")
    repl.expect(pexpect.EOF)
    history = tmp_path / "opswitch" / "history"
    assert history.exists() and "/temp 0.3" in history.read_text()
