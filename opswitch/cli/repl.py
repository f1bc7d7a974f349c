"""The interactive loop of ``opswitch generate --interactive``.

Loads once, then reads prompts.  Slash commands change the settings for the
next prompts; a bad one prints one line on stderr and changes nothing.
Ctrl-C stops the current generation, not the session; Ctrl-D, ``quit`` or
``exit`` leave.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from opswitch.cli.session import describe_settings, generate_once
from opswitch.core.errors import OpswitchError
from opswitch.generation import GenerationConfig

if TYPE_CHECKING:
    from opswitch.api import LanguageModel

HELP = """Commands:
  /temp X      temperature (0 = greedy)       /topk N     top-k (0 = off)
  /topp X      top-p (0 = off)                /tokens N   max new tokens
  /seed N      random seed                    /backend B  move the model to backend B
  /config      show the current settings      /help       this help
  quit, exit or Ctrl-D to leave; Ctrl-C stops a generation"""

# command -> (setting, parser, description)
SETTERS = {
    "/temp": ("temperature", float, "Temperature"),
    "/topk": ("top_k", int, "Top-k"),
    "/topp": ("top_p", float, "Top-p"),
    "/tokens": ("max_new_tokens", int, "Max tokens"),
    "/seed": ("seed", int, "Seed"),
}


def _enable_line_editing() -> Path | None:
    """Arrow keys and history where readline exists; history kept across sessions."""
    try:
        import readline  # optional: not on every platform
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return None
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    history = state / "opswitch" / "history"
    try:
        readline.read_history_file(history)
    except (OSError, ValueError):
        pass
    readline.set_history_length(1000)
    return history


def _save_history(history: Path | None) -> None:
    if history is None:
        return
    import readline  # optional: imported above when it exists

    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(history)
    except OSError:
        pass  # history is a convenience; never fail the session over it


class Repl:
    def __init__(self, lm: LanguageModel, config: GenerationConfig, console,
                 first_prompt: str | None = None) -> None:
        self.lm, self.config, self.console = lm, config, console
        self.first_prompt = first_prompt

    def run(self) -> int:
        history = _enable_line_editing() if sys.stdin.isatty() else None
        say = self.console.info
        say("=== Interactive mode ===")
        say("Enter a prompt to generate text. Type /help for commands, quit or exit to leave.")
        say()
        try:
            if self.first_prompt:
                self.generate(self.first_prompt)
            while True:
                try:
                    line = input("> ")
                except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as shells do
                    print(file=sys.stderr)
                    continue
                except EOFError:
                    print(file=sys.stderr)
                    break
                line = line.strip()
                if not line:
                    continue
                if line in ("quit", "exit"):
                    break
                if line.startswith("/"):
                    self.command(line)
                else:
                    self.generate(line)
        finally:
            _save_history(history)
        say("Goodbye!")
        return 0

    def generate(self, prompt: str) -> None:
        try:
            generate_once(self.lm, prompt, self.config, self.console)
        except OpswitchError as exc:
            self.console.error(str(exc))
        except KeyboardInterrupt:  # outside the token loop (e.g. while encoding): same promise
            self.console.info("\ninterrupted")
        print(file=sys.stderr)

    def command(self, line: str) -> None:
        name, *rest = line.split()
        try:
            if name in SETTERS:
                self.set(name, rest)
            elif name == "/backend":
                self.switch_backend(rest)
            elif name == "/config":
                self.console.info("Current settings:")
                for entry in [*describe_settings(self.config), f"Backend:     {self.lm.backend.spec}"]:
                    self.console.info(f"  {entry}")
            elif name == "/help":
                self.console.info(HELP)
            else:
                raise OpswitchError(f"unknown command {name}: type /help for the list")
        except OpswitchError as exc:
            self.console.error(str(exc))

    def set(self, name: str, rest: list[str]) -> None:
        field, parse, label = SETTERS[name]
        if len(rest) != 1:
            raise OpswitchError(f"usage: {name} <value>")
        try:
            value = parse(rest[0])
        except ValueError:
            raise OpswitchError(f"{name} needs {'an integer' if parse is int else 'a number'}, "
                                f"got {rest[0]!r}") from None
        self.config = self.config.replace(**{field: value})  # validates; unchanged on error
        self.console.info(f"{label} set to {value}")

    def switch_backend(self, rest: list[str]) -> None:
        if len(rest) != 1:
            raise OpswitchError("usage: /backend <name>  (see `opswitch backends`)")
        self.lm.to(rest[0])  # on failure the model stays where it was
        self.console.info(f"Backend: {self.lm.selection_reason}")
        if self.lm.model.ops.describe_fallbacks():
            self.console.info(f"  fallback ops: {self.lm.model.ops.describe_fallbacks()}")
