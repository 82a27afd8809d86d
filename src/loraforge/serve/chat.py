"""`loraforge chat`: a terminal chat with streamed tokens and multi-turn history.

Commands typed at the prompt: ``exit`` (or ``quit``) ends, ``clear`` forgets the history, ``/think`` and
``/no_think`` switch Qwen3-style reasoning on and off, ``/system TEXT`` sets the system prompt (``/system``
alone removes it). Reasoning is shown dimmed on a terminal and between ``[thinking]`` markers otherwise.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..data.conversation import Message
from .engine import ChatEngine, ContextLengthError, SamplingParams

DIM, RESET = "\033[2m", "\033[0m"
HELP = ("Type a message and press Enter. Commands: `exit` to quit, `clear` to forget the history, "
        "`/think` or `/no_think` to switch reasoning, `/system TEXT` to set the system prompt.")


class ChatSession:
    """The state of one terminal conversation: history, system prompt and thinking mode."""

    def __init__(self, engine: ChatEngine, params: SamplingParams, *, system: str | None = None,
                 enable_thinking: bool | None = None):
        self.engine = engine
        self.params = params
        self.system = system if system is not None else engine.default_system
        self.enable_thinking = engine.enable_thinking if enable_thinking is None else enable_thinking
        self.history: list[Message] = []

    def command(self, line: str) -> str | None:
        """Handle a command line; return the text to print, or None when ``line`` is a message."""
        word = line.strip()
        if word.lower() in ("clear", "/clear"):
            self.history.clear()
            return "History cleared."
        if word in ("/think", "/no_think"):
            if not self.engine.supports_thinking:
                return "This model's template has no thinking mode; the setting is ignored."
            self.enable_thinking = word == "/think"
            return f"Thinking {'on' if self.enable_thinking else 'off'}."
        if word == "/system" or word.startswith("/system "):
            self.system = word[len("/system"):].strip() or None
            self.history.clear()
            return f"System prompt {'set' if self.system else 'removed'}; history cleared."
        if word in ("/help", "help"):
            return HELP
        return None


def run_chat(engine: ChatEngine, params: SamplingParams, *, system: str | None = None,
             enable_thinking: bool | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
             color: bool | None = None) -> int:
    """Read messages from ``stdin`` until ``exit`` or end of input, streaming each answer to ``stdout``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if color is None:
        color = stdout.isatty()
    session = ChatSession(engine, params, system=system, enable_thinking=enable_thinking)
    mode = ""
    if engine.supports_thinking:
        mode = f" Thinking is {'on' if session.enable_thinking else 'off'}."
    print(f"loraforge chat with {engine.model_id}. {HELP}{mode}", file=stdout, flush=True)
    while True:
        print("\nUser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print("", file=stdout)
            return 0
        text = line.rstrip("\n")
        if text.strip().lower() in ("exit", "quit", "/exit", "/quit"):
            return 0
        if not text.strip():
            continue
        reply = session.command(text)
        if reply is not None:
            print(reply, file=stdout, flush=True)
            continue
        _answer(session, text, stdout, color)


def _answer(session: ChatSession, text: str, out: TextIO, color: bool) -> None:
    engine = session.engine
    messages = session.history + [Message(role="user", content=text)]
    try:
        prompt = engine.encode(messages, system=session.system, enable_thinking=session.enable_thinking)
        params = engine.fit_params(prompt, session.params)
    except ContextLengthError as err:
        print(f"\n[error] {err.message}. Type `clear` to start a new conversation.", file=out, flush=True)
        return
    print("Assistant: ", end="", file=out, flush=True)
    stream = engine.stream(prompt, params)
    in_reasoning = False
    try:
        for delta in stream:
            if delta.kind == "reasoning" and not in_reasoning:
                print(DIM if color else "[thinking] ", end="", file=out)
                in_reasoning = True
            elif delta.kind == "content" and in_reasoning:
                print(RESET if color else " [/thinking]\n", end="", file=out)
                in_reasoning = False
            print(delta.text, end="", file=out, flush=True)
    except KeyboardInterrupt:
        stream.close()
        print(f"{RESET if color and in_reasoning else ''}\n[interrupted]", file=out, flush=True)
        return
    if in_reasoning:
        print(RESET if color else " [/thinking]", end="", file=out)
    print("", file=out, flush=True)
    done = stream.completion
    answer = done.content if done is not None else ""
    # The history keeps answers without their reasoning, as Qwen3's template expects.
    session.history = messages + [Message(role="assistant", content=answer)]
