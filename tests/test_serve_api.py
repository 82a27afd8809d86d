"""`loraforge api` against a live server on loopback, driven by the official `openai` client."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
torch = pytest.importorskip("torch")

from loraforge.data.conversation import Message  # noqa: E402
from loraforge.serve.api import create_app  # noqa: E402
from loraforge.serve.engine import ChatEngine, SamplingParams  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


KEY = "sk-test-loraforge"
CONTEXT = 200
# Greedy decoding; the repetition penalty keeps the random tiny model from repeating one newline forever, so
# different prompts get visibly different answers.
DEFAULTS = SamplingParams(max_new_tokens=16, repetition_penalty=2.0)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.config import DataArguments
    from loraforge.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_path))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path)).eval()
    template = resolve_template(DataArguments(template="qwen3"), tokenizer)
    return ChatEngine(model, tokenizer, template, model_id="tiny-random-qwen3", context_length=CONTEXT)


@pytest.fixture(scope="module")
def base_url(engine):
    app = create_app(engine, api_key=KEY, defaults=DEFAULTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def _params(max_tokens: int) -> SamplingParams:
    return dataclasses.replace(DEFAULTS, max_new_tokens=max_tokens)


def _expected(engine, text: str, max_tokens: int, **kw):
    prompt = engine.encode([Message("user", text)], **kw)
    return engine.complete(prompt, _params(max_tokens)), len(prompt)


def test_models_lists_the_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-random-qwen3"]


def test_plain_completion_matches_greedy_engine_and_counts_usage(client, engine):
    resp = client.chat.completions.create(model="tiny-random-qwen3", max_tokens=10, temperature=0,
                                          messages=[{"role": "user", "content": "Write a haiku about rain."}])
    want, prompt_len = _expected(engine, "Write a haiku about rain.", 10)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.content
    assert choice.finish_reason == want.finish_reason
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len, want.completion_tokens)
    assert resp.usage.total_tokens == prompt_len + want.completion_tokens
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_system_and_history_reach_the_prompt(client, engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "now?"}]}]
    resp = client.chat.completions.create(model="x", messages=messages, max_tokens=6)
    prompt = engine.encode([Message("user", "hi"), Message("assistant", "hello"), Message("user", "and now?")],
                           system="You are terse.")
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.choices[0].message.content == engine.complete(prompt, _params(6)).content


def test_streaming_equals_plain(client, engine):
    kwargs = dict(model="tiny-random-qwen3", max_tokens=12,
                  messages=[{"role": "user", "content": "Count to five."}])
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stop_sequence_cuts_the_answer(client, engine):
    want, _ = _expected(engine, "Say something long.", 16, enable_thinking=False)
    text = want.content
    assert len(text) > 4, "the tiny model should produce some text"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    resp = client.chat.completions.create(model="x", max_tokens=16, stop=[stop], extra_body={"enable_thinking": False},
                                          messages=[{"role": "user", "content": "Say something long."}])
    assert resp.choices[0].message.content == text[:text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def _raw(url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_wrong_or_missing_key_is_401(base_url):
    bad = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = _raw(base_url + "/chat/completions", body=b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("kwargs,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])
def test_bad_requests_are_400_openai_errors(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", **kwargs)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["param"] == param


def test_overlong_prompt_is_400_and_server_survives(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 400}])
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # fits, but not with the tokens asked for
        client.chat.completions.create(model="x", max_tokens=CONTEXT, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "context_length_exceeded"
    ok = client.chat.completions.create(model="x", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert ok.usage.completion_tokens == 3


def test_eight_concurrent_clients_get_their_own_answers(base_url, engine):
    prompts = [f"Question number {i}: what is {i} times {i + 3}?" for i in range(8)]
    expected = [_expected(engine, p, 20)[0].content for p in prompts]  # sequential greedy reference
    assert len(set(expected)) > 1, "prompts should lead to different answers"

    def ask(i: int) -> str:
        c = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
        if i % 2:  # half of them stream, to mix both paths
            stream = c.chat.completions.create(model="x", max_tokens=20, stream=True,
                                               messages=[{"role": "user", "content": prompts[i]}])
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        resp = c.chat.completions.create(model="x", max_tokens=20, messages=[{"role": "user", "content": prompts[i]}])
        return resp.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == expected


def test_unknown_route_and_malformed_json(base_url):
    status, body = _raw(base_url + "/nothing", {"Authorization": f"Bearer {KEY}"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = _raw(base_url + "/chat/completions", {"Authorization": f"Bearer {KEY}"}, body=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_cli_api_binds_loopback_and_takes_key_from_env(tiny_qwen3_path, tmp_path):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAFORGE_API_KEY": "env-key"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "api", f"model_name_or_path={tiny_qwen3_path}",
                             "template=qwen3", "max_new_tokens=4", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if _raw(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        status, body = _raw(url + "/v1/models", {"Authorization": "Bearer env-key"})
        assert status == 200 and body["data"][0]["id"] == "tiny-random-qwen3"
        assert _raw(url + "/v1/models")[0] == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0, timeout=60)
        resp = c.chat.completions.create(model="tiny-random-qwen3", messages=[{"role": "user", "content": "hi"}])
        assert resp.usage.completion_tokens == 4  # max_new_tokens from the command line is the default
        assert "serving tiny-random-qwen3 at http://127.0.0.1:" in (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
