"""The one conversation type every dataset format is converted into, and every template renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant", "observation", "function"]
# user: a human turn; assistant: a model answer; function: a model turn that calls tools (content is the JSON
# list of calls, LLaMA-Factory's convention); observation: the tool results fed back to the model.
PROMPT_ROLES = ("user", "observation")
ANSWER_ROLES = ("assistant", "function")


@dataclass
class Message:
    role: Role
    content: str
    reasoning: str | None = None  # the assistant's thinking (Qwen3 <think>...</think>), when the data has it


@dataclass
class Conversation:
    """A validated chat: prompt and answer turns alternate, starting with a prompt and ending with an answer
    (an answer may be absent for prediction prompts)."""

    messages: list[Message]
    system: str | None = None
    tools: str | None = None  # JSON text of the tool list (OpenAI function schema), as LLaMA-Factory stores it
    source: str = ""  # "file.json:row 12" for error messages
    meta: dict = field(default_factory=dict)

    def turns(self) -> list[tuple[Message, Message | None]]:
        """(prompt, answer) pairs in order; the last answer may be None for a generation prompt."""
        pairs = []
        msgs = self.messages
        for i in range(0, len(msgs), 2):
            pairs.append((msgs[i], msgs[i + 1] if i + 1 < len(msgs) else None))
        return pairs
