"""The Chat page's models: a base slot and an adapter slot, each a :class:`loraforge.serve.engine.ChatEngine`.

The engines are the ones `loraforge chat` and `loraforge api` use (same template, stop tokens and reasoning
split), loaded in this process so answers stream without a second server. Each engine generates one answer at a
time; the two slots answer the same question side by side.
"""

from __future__ import annotations

import gc
import json
import threading
from typing import Any, Iterator

from ..errors import ConfigError, LoraforgeError

SLOTS = ("base", "adapter")


class ChatModels:
    """Load, unload and stream from the base and the fine-tuned model."""

    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}
        self.labels: dict[str, str] = {}
        self._lock = threading.Lock()

    def load(self, slot: str, values: dict[str, Any]) -> dict[str, Any]:
        """Load ``slot`` from the page's config values (the adapter slot needs ``adapter_name_or_path``)."""
        from ..config import load_config
        from ..serve.engine import build_engine

        if slot not in SLOTS:
            raise ConfigError([f"unknown chat slot {slot!r}; expected base or adapter"])
        values = dict(values)
        if slot == "base":
            values.pop("adapter_name_or_path", None)
        elif not values.get("adapter_name_or_path"):
            raise ConfigError(["`adapter_name_or_path` is empty: choose the trained adapter folder (the training "
                               "run's output_dir) to chat with the fine-tuned model"])
        cfg = load_config(values, purpose="chat", build_training_args=False)
        with self._lock:
            self._unload(slot)
            self.engines[slot] = build_engine(cfg)
            self.labels[slot] = self.engines[slot].model_id
        return self.describe()

    def unload(self, slot: str) -> dict[str, Any]:
        with self._lock:
            self._unload(slot)
        return self.describe()

    def _unload(self, slot: str) -> None:
        if self.engines.pop(slot, None) is not None:
            self.labels.pop(slot, None)
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the memory back to a training job started next
            except ImportError:
                pass

    def describe(self) -> dict[str, Any]:
        return {slot: ({"model": self.labels[slot], "thinking": self.engines[slot].supports_thinking}
                       if slot in self.engines else None) for slot in SLOTS}

    def stream(self, slot: str, messages: list[dict[str, str]], *, thinking: bool | None,
               max_new_tokens: int | None, system: str | None) -> Iterator[str]:
        """NDJSON lines: ``{"kind": "reasoning"|"content", "text": ...}`` as generated, then ``{"done": ...}``.

        Errors (no model loaded, prompt too long) arrive as one ``{"error": ...}`` line the page shows.
        """
        from ..data.conversation import Message
        from ..serve.engine import SamplingParams

        engine = self.engines.get(slot)
        if engine is None:
            yield json.dumps({"error": f"no {slot} model is loaded; press Load first"}) + "\n"
            return
        try:
            history = [Message(role=m["role"], content=str(m["content"])) for m in messages]
            prompt = engine.encode(history, system=system or None, enable_thinking=thinking)
            params = engine.fit_params(prompt, SamplingParams(max_new_tokens=max_new_tokens or 256))
        except (LoraforgeError, KeyError) as err:
            yield json.dumps({"error": getattr(err, "message", str(err))}, ensure_ascii=False) + "\n"
            return
        stream = engine.stream(prompt, params)
        try:
            for delta in stream:
                yield json.dumps({"kind": delta.kind, "text": delta.text}, ensure_ascii=False) + "\n"
        finally:
            stream.close()  # the page went away mid-answer: stop generating and free the engine
        done = stream.completion
        yield json.dumps({"done": True, "finish_reason": done.finish_reason if done else None,
                          "completion_tokens": done.completion_tokens if done else 0}) + "\n"
