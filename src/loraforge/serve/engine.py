"""The generation engine shared by `loraforge chat` and `loraforge api`.

One :class:`ChatEngine` wraps a loaded model, its tokenizer and chat template. It builds prompts through the
template (so chat renders exactly what training used), streams tokens with transformers'
``TextIteratorStreamer``, stops on the template's stop tokens and on user stop strings, splits Qwen3-style
reasoning from the answer as it streams, and runs one generation at a time (a lock), so concurrent callers
are queued and never interleaved.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..data.conversation import Conversation, Message
from ..errors import LoraforgeError
from .text import ReasoningSplitter, StopStringFilter

if TYPE_CHECKING:
    from ..config import GeneratingArguments, RunConfig

logger = logging.getLogger(__name__)

DEFAULT_THOUGHT_TAGS = ("<think>", "</think>")


class ContextLengthError(LoraforgeError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


@dataclass
class SamplingParams:
    """Decoding settings of one request."""

    max_new_tokens: int = 512  # 0 or less: generate up to max_length (prompt + answer) instead
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_config(cls, gen: "GeneratingArguments", **changes: Any) -> "SamplingParams":
        """The config's generation settings, with ``changes`` (None values are ignored) on top."""
        params = cls(max_new_tokens=gen.max_new_tokens, max_length=gen.max_length, do_sample=gen.do_sample,
                     temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                     repetition_penalty=gen.repetition_penalty, num_beams=gen.num_beams,
                     length_penalty=gen.length_penalty)
        for key, value in changes.items():
            if value is not None:
                setattr(params, key, value)
        return params

    def new_token_budget(self, prompt_len: int) -> int:
        """Tokens a prompt of ``prompt_len`` may generate: ``max_new_tokens``, or when that is 0 or less
        (LLaMA-Factory's rule) what ``max_length`` leaves after the prompt."""
        if self.max_new_tokens > 0 or self.max_length is None:
            return self.max_new_tokens
        room = self.max_length - prompt_len
        if room <= 0:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens, already max_length={self.max_length}",
                                     hint="raise `max_length`, or set `max_new_tokens` to a positive count")
        return room

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (sampling knobs only when sampling)."""
        length = ({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens > 0 or self.max_length is None
                  else {"max_length": self.max_length})  # transformers counts max_length from the prompt's start
        kwargs: dict[str, Any] = {**length, "do_sample": self.do_sample, "repetition_penalty": self.repetition_penalty}
        if self.num_beams > 1:
            kwargs.update(num_beams=self.num_beams, length_penalty=self.length_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence "temperature is set but do_sample is False" from the model's generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Delta:
    """A piece of streamed text: ``kind`` is "reasoning" or "content"."""

    kind: str
    text: str


@dataclass
class Completion:
    """A finished generation."""

    content: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or stop string) or "length"


class GenerationStream:
    """An iterator of :class:`Delta` for one generation; ``completion`` is set once it is exhausted.

    The engine lock is taken on the first ``next()`` and released when the stream ends or is closed, so a
    caller that abandons a stream (a client disconnect) must call :meth:`close`, which also stops the model.
    """

    def __init__(self, engine: "ChatEngine", prompt_ids: list[int], params: SamplingParams):
        self._engine = engine
        self._prompt_ids = prompt_ids
        self._params = params
        self._cancel = threading.Event()
        self._iter: Iterator[Delta] | None = None
        self.completion: Completion | None = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> Delta:
        if self._iter is None:
            self._iter = self._engine._run(self._prompt_ids, self._params, self._cancel, self)
        return next(self._iter)

    def close(self) -> None:
        """Stop generating and release the engine."""
        self._cancel.set()
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]


class ChatEngine:
    """Prompt building, streaming generation and stop handling over one loaded model."""

    def __init__(self, model: Any, tokenizer: Any, template: Any, *, model_id: str = "loraforge",
                 default_system: str | None = None, enable_thinking: bool = True,
                 context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.model_id = model_id
        self.default_system = default_system
        self.enable_thinking = enable_thinking
        self.context_length = context_length or _model_context(model)
        self.stop_token_ids = list(template.stop_token_ids(tokenizer))
        tags = getattr(template, "thought_words", None) or DEFAULT_THOUGHT_TAGS
        self.thought_tags: tuple[str, str] = (str(tags[0]), str(tags[1]))
        in_vocab = self.thought_tags[0] in tokenizer.get_vocab()
        self.supports_thinking = bool(getattr(template, "supports_thinking", in_vocab))
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()

    # prompts --------------------------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Message], *, system: str | None = None,
               enable_thinking: bool | None = None) -> list[int]:
        """Token ids of the prompt for ``messages`` (ending with a user/observation turn) via the template."""
        conv = Conversation(messages=list(messages), system=system if system is not None else self.default_system)
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        with self._encode_lock:  # fast tokenizers must not be entered from two threads at once
            return list(self.template.encode_prompt(conv, self.tokenizer, enable_thinking=thinking))

    def fit_params(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                   max_tokens_explicit: bool = False) -> SamplingParams:
        """Check the prompt fits the context; shrink ``max_new_tokens`` to the room left unless it was asked
        for explicitly (then a prompt + max_tokens over the context is an error, as in OpenAI's API)."""
        n, limit = len(prompt_ids), self.context_length
        if n >= limit:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {limit} tokens",
                hint="shorten the messages (or `clear` the chat history)")
        params = SamplingParams(**{**params.__dict__, "max_new_tokens": params.new_token_budget(n)})
        room = limit - n
        if params.max_new_tokens > room:
            if max_tokens_explicit:
                raise ContextLengthError(
                    f"the prompt has {n} tokens and max_tokens asks for {params.max_new_tokens} more, "
                    f"over the model's context of {limit} tokens",
                    hint=f"ask for at most {room} tokens or shorten the messages")
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": room})
        return params

    # generation -----------------------------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """A lazily started stream of reasoning/content deltas; see :class:`GenerationStream`."""
        return GenerationStream(self, list(prompt_ids), params)

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Generate to the end and return the whole completion (same code path as streaming)."""
        stream = self.stream(prompt_ids, params)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def reasoning_splitter(self, prompt_ids: Sequence[int]) -> ReasoningSplitter:
        """A splitter in the state the prompt leaves the model in (inside, after or before a reasoning block)."""
        return reasoning_splitter_for(self.tokenizer, prompt_ids, self.thought_tags,
                                      supports_thinking=self.supports_thinking)

    def _run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
             handle: GenerationStream) -> Iterator[Delta]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001 - transformers' signature
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        with self._lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            device = getattr(self.model, "device", torch.device("cpu"))
            input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            kwargs = dict(params.generate_kwargs(), input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          streamer=streamer, eos_token_id=self.stop_token_ids or None,
                          pad_token_id=_pad_id(self.tokenizer, self.stop_token_ids),
                          stopping_criteria=StoppingCriteriaList([_Cancelled()]))
            if params.stop:
                kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    with torch.inference_mode():
                        result["sequences"] = self.model.generate(**kwargs)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
                    result["error"] = err
                    streamer.end()

            worker = threading.Thread(target=work, name="loraforge-generate", daemon=True)
            worker.start()
            stops = StopStringFilter(params.stop)
            splitter = self.reasoning_splitter(prompt_ids)
            parts: dict[str, list[str]] = {"reasoning": [], "content": []}
            try:
                for text in streamer:
                    if stops.stopped:
                        continue  # drain the streamer; the model stops at the stop string on its own
                    for kind, piece in splitter.feed(stops.feed(text)):
                        parts[kind].append(piece)
                        yield Delta(kind, piece)
                for kind, piece in splitter.feed(stops.flush()) + splitter.flush():
                    parts[kind].append(piece)
                    yield Delta(kind, piece)
            finally:
                cancel.set()
                worker.join()
            if "error" in result:
                raise result["error"]
            generated = result["sequences"][0, len(prompt_ids):].tolist()
            ended_by_token = bool(generated) and generated[-1] in self.stop_token_ids
            finish = "stop" if ended_by_token or stops.stopped or len(generated) < params.max_new_tokens else "length"
            reasoning = "".join(parts["reasoning"]).rstrip() if splitter.saw_reasoning else None
            handle.completion = Completion(content="".join(parts["content"]), reasoning=reasoning,
                                           prompt_tokens=len(prompt_ids), completion_tokens=len(generated),
                                           finish_reason=finish)


def reasoning_splitter_for(tokenizer: Any, prompt_ids: Sequence[int], tags: tuple[str, str], *,
                           supports_thinking: bool = True) -> ReasoningSplitter:
    """A :class:`ReasoningSplitter` for text generated after ``prompt_ids``: inside the block when the prompt
    opened it, answer-only when the prompt closed it (Qwen3 no-think) or the model has no thinking mode."""
    tail = tokenizer.decode(list(prompt_ids[-8:]), skip_special_tokens=False)
    opened, closed = tail.rfind(tags[0]), tail.rfind(tags[1])
    if opened > closed:
        return ReasoningSplitter(*tags, in_reasoning=True)
    return ReasoningSplitter(*tags, detect=supports_thinking and closed < 0)


def _pad_id(tokenizer: Any, stop_ids: list[int]) -> int | None:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop_ids[0] if stop_ids else tokenizer.eos_token_id


def _model_context(model: Any) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def load_inference_model(cfg: "RunConfig") -> tuple[Any, Any, Any]:
    """Load tokenizer, chat template and model (base, base + adapters, or a merged folder) for generation."""
    from ..data.templates import resolve_template
    from ..models.loader import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data, tokenizer)
    model = load_model(cfg, tokenizer, is_trainable=False)
    model.eval()
    return model, tokenizer, template


def build_engine(cfg: "RunConfig", *, model_id: str | None = None) -> ChatEngine:
    """Load the model named by ``cfg`` and wrap it in a :class:`ChatEngine` with the config's defaults."""
    model, tokenizer, template = load_inference_model(cfg)
    system = cfg.generation.default_system or cfg.data.default_system
    thinking = cfg.data.enable_thinking is not False
    return ChatEngine(model, tokenizer, template, model_id=model_id or _model_id(cfg), default_system=system,
                      enable_thinking=thinking, context_length=cfg.generation.max_context_length)


def _model_id(cfg: "RunConfig") -> str:
    from pathlib import Path

    name = Path(str(cfg.model.model_name_or_path)).name or str(cfg.model.model_name_or_path)
    if cfg.model.adapter_name_or_path:
        name += "+" + Path(cfg.model.adapter_name_or_path.split(",")[-1].strip()).name
    return name
