"""The chat engine and terminal chat with a scripted model (exact streamed text, reasoning, stops, history)
and with the tiny random Qwen3 (real generate, streaming equals non-streaming)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from loraforge.data.conversation import Message  # noqa: E402
from loraforge.serve.chat import run_chat  # noqa: E402
from loraforge.serve.engine import ChatEngine, ContextLengthError, SamplingParams  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedModel:
    """Behaves like ``model.generate`` with a streamer, but always answers ``reply`` token by token."""

    def __init__(self, tokenizer, replies: list[str], context: int = 4096):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.prompts: list[list[int]] = []

    def eval(self):
        return self

    def generate(self, input_ids, streamer=None, max_new_tokens=16, eos_token_id=None, stopping_criteria=None,
                 **_):
        prompt = input_ids[0].tolist()
        self.prompts.append(prompt)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        script = self.tokenizer.encode(reply, add_special_tokens=False) + [eos_token_id[0]]
        if streamer is not None:
            streamer.put(input_ids[0])  # the prompt, skipped by skip_prompt=True
        out: list[int] = []
        for tok in script[:max_new_tokens]:
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
            seq = torch.tensor([prompt + out])
            if tok in eos_token_id or any(bool(c(seq, None).all()) for c in stopping_criteria or []):
                break
        if streamer is not None:
            streamer.end()
        return torch.tensor([prompt + out])


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_path))


@pytest.fixture(scope="module")
def template(tokenizer):
    from loraforge.config import DataArguments
    from loraforge.data.templates import resolve_template

    return resolve_template(DataArguments(template="qwen3"), tokenizer)


def _engine(tokenizer, template, replies, **kw):
    return ChatEngine(ScriptedModel(tokenizer, replies, kw.pop("context", 4096)), tokenizer, template,
                      model_id="scripted", **kw)


def test_stream_splits_reasoning_and_counts_tokens(tokenizer, template):
    reply = "<think>\nTwo plus two.\n</think>\n\nIt is 4."
    engine = _engine(tokenizer, template, [reply])
    prompt = engine.encode([Message("user", "2+2?")])
    stream = engine.stream(prompt, SamplingParams(max_new_tokens=64))
    deltas = list(stream)
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "Two plus two.\n"
    assert "".join(d.text for d in deltas if d.kind == "content") == "It is 4."
    done = stream.completion
    assert (done.content, done.reasoning, done.finish_reason) == ("It is 4.", "Two plus two.", "stop")
    assert done.prompt_tokens == len(prompt)
    assert done.completion_tokens == len(tokenizer.encode(reply, add_special_tokens=False)) + 1  # + <|im_end|>


def test_stop_string_and_length_finish(tokenizer, template):
    engine = _engine(tokenizer, template, ["alpha beta STOP gamma"])
    prompt = engine.encode([Message("user", "go")], enable_thinking=False)
    done = engine.complete(prompt, SamplingParams(max_new_tokens=64, stop=[" STOP"]))
    assert (done.content, done.finish_reason) == ("alpha beta", "stop")
    done = engine.complete(prompt, SamplingParams(max_new_tokens=2))
    assert done.finish_reason == "length" and done.completion_tokens == 2


def test_context_length_checks(tokenizer, template):
    engine = _engine(tokenizer, template, ["x"], context=40)
    prompt = engine.encode([Message("user", "hi")])
    assert engine.fit_params(prompt, SamplingParams(max_new_tokens=1000)).max_new_tokens == 40 - len(prompt)
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.fit_params(prompt, SamplingParams(max_new_tokens=1000), max_tokens_explicit=True)
    with pytest.raises(ContextLengthError, match="context is 40 tokens"):
        engine.fit_params(engine.encode([Message("user", "word " * 60)]), SamplingParams())


def test_max_length_bounds_prompt_plus_answer_when_max_new_tokens_is_off(tokenizer, template):
    engine = _engine(tokenizer, template, ["x"], context=40)
    prompt = engine.encode([Message("user", "hi")])
    off = SamplingParams(max_new_tokens=0, max_length=len(prompt) + 5)
    assert engine.fit_params(prompt, off).max_new_tokens == 5
    assert off.generate_kwargs()["max_length"] == len(prompt) + 5 and "max_new_tokens" not in off.generate_kwargs()
    on = SamplingParams(max_new_tokens=3, max_length=len(prompt) + 5)  # LLaMA-Factory: max_new_tokens wins
    assert on.new_token_budget(len(prompt)) == 3 and "max_length" not in on.generate_kwargs()
    with pytest.raises(ContextLengthError, match="raise `max_length`"):
        SamplingParams(max_new_tokens=0, max_length=len(prompt)).new_token_budget(len(prompt))


def test_terminal_chat_history_clear_think_and_exit(tokenizer, template):
    replies = ["<think>\nhmm\n</think>\n\nHello!", "Fine.", "Again."]
    engine = _engine(tokenizer, template, replies, default_system="Be nice.")
    out = io.StringIO()
    stdin = io.StringIO("hi\n/no_think\nhow are you\nclear\n/system Be brief.\nagain\nexit\nnever read\n")
    assert run_chat(engine, SamplingParams(max_new_tokens=64), stdin=stdin, stdout=out, color=False) == 0
    text = out.getvalue()
    assert "Assistant: [thinking] hmm\n [/thinking]\nHello!" in text
    assert "Thinking off." in text and "History cleared." in text and "System prompt set" in text
    p1, p2, p3 = (tokenizer.decode(p) for p in engine.model.prompts)
    assert "Be nice." in p1 and p1.endswith("<|im_start|>assistant\n")           # thinking on: model opens it
    # the second prompt holds the first exchange (answer without its reasoning) and an empty think block
    assert "hi<|im_end|>" in p2 and "Hello!" in p2 and "hmm" not in p2
    assert p2.endswith("<think>\n\n</think>\n\n")
    # after clear and a new system prompt, only the new message
    assert "Be brief." in p3 and "Be nice." not in p3 and "how are you" not in p3
    assert len(engine.model.prompts) == 3  # `never read` after exit


def test_terminal_chat_color_and_overlong_message(tokenizer, template):
    engine = _engine(tokenizer, template, ["<think>\nx\n</think>\n\ny"], context=60)
    out = io.StringIO()
    run_chat(engine, SamplingParams(max_new_tokens=8), stdin=io.StringIO("hi\n" + "long " * 80 + "\n"),
             stdout=out, color=True)
    text = out.getvalue()
    assert "\033[2mx\n\033[0my" in text                                    # reasoning dimmed
    assert "[error] the prompt has" in text and "`clear`" in text          # refused, not a crash


@pytest.fixture(scope="module")
def tiny_engine(tiny_qwen3_path, tokenizer, template):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path)).eval()
    return ChatEngine(model, tokenizer, template, model_id="tiny")


def test_real_model_stream_equals_complete_and_is_greedy(tiny_engine):
    prompt = tiny_engine.encode([Message("user", "Tell me a story about a cat.")], enable_thinking=False)
    params = SamplingParams(max_new_tokens=12)
    first = tiny_engine.complete(prompt, params)
    stream = tiny_engine.stream(prompt, params)
    streamed = "".join(d.text for d in stream)
    assert streamed == first.content == stream.completion.content
    assert first.completion_tokens == 12 and first.finish_reason == "length"
    ids = tiny_engine.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert first.content == tiny_engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_closing_a_stream_releases_the_engine(tiny_engine):
    prompt = tiny_engine.encode([Message("user", "hello")])
    stream = tiny_engine.stream(prompt, SamplingParams(max_new_tokens=200))
    next(stream)
    stream.close()
    assert tiny_engine._lock.acquire(timeout=5)
    tiny_engine._lock.release()
