"""`loraforge api`: an OpenAI-compatible chat server (FastAPI + uvicorn) over one :class:`ChatEngine`.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON or SSE streaming), ``GET /health``.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with 4xx codes; with an API key
set, requests without ``Authorization: Bearer <key>`` get 401. The engine runs one generation at a time, so
concurrent requests wait their turn and never mix their outputs.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..data.conversation import Message
from .engine import ChatEngine, ContextLengthError, SamplingParams

logger = logging.getLogger(__name__)

ROLE_MAP = {"user": "user", "assistant": "assistant", "tool": "observation", "function": "observation"}


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[Any]] = None


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that loraforge honours; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = 1
    seed: Optional[int] = None
    tools: Optional[list[Any]] = None
    enable_thinking: Optional[bool] = None  # extension (also read from chat_template_kwargs, as vLLM does)
    chat_template_kwargs: Optional[dict[str, Any]] = None


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{index}]: content part of type {part.type!r} is not supported; "
                           "loraforge serves text models (use type 'text')", param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


def to_conversation(messages: list[ChatMessage]) -> tuple[list[Message], str | None]:
    """OpenAI messages -> (loraforge messages ending with a prompt turn, system text or None)."""
    system_parts: list[str] = []
    turns: list[Message] = []
    for i, msg in enumerate(messages):
        if msg.role in ("system", "developer"):
            system_parts.append(_text_of(msg, i))
            continue
        if msg.tool_calls:
            raise APIError(400, f"messages[{i}]: tool calls are not supported by `loraforge api` yet",
                           param=f"messages.{i}.tool_calls")
        role = ROLE_MAP[msg.role]
        expect_prompt = len(turns) % 2 == 0
        if (role in ("user", "observation")) != expect_prompt:
            want = "a user (or tool) message" if expect_prompt else "an assistant message"
            raise APIError(400, f"messages[{i}] has role {msg.role!r} but {want} was expected: after the system "
                           "messages, user and assistant messages must alternate", param="messages")
        turns.append(Message(role=role, content=_text_of(msg, i)))
    if not turns or len(turns) % 2 == 0:
        raise APIError(400, "the last message must be a user (or tool) message for the model to answer",
                       param="messages")
    return turns, ("\n\n".join(system_parts) if system_parts else None)


def _sampling(req: ChatCompletionRequest, defaults: SamplingParams) -> tuple[SamplingParams, bool]:
    params = SamplingParams(**{**defaults.__dict__, "stop": [], "seed": None})
    explicit_max = req.max_completion_tokens or req.max_tokens
    if explicit_max:
        params.max_new_tokens = explicit_max
    if req.temperature is not None:  # temperature 0 means greedy, as with OpenAI
        params.do_sample = req.temperature > 0
        if params.do_sample:
            params.temperature = req.temperature
    if req.top_p is not None:
        params.top_p = req.top_p
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "`stop` takes up to 4 non-empty strings", param="stop")
        params.stop = stops
    params.seed = req.seed
    return params, bool(explicit_max)


def create_app(engine: ChatEngine, *, api_key: str | None = None, defaults: SamplingParams | None = None) -> Any:
    """The FastAPI application serving ``engine``; ``defaults`` are the decoding settings of the config."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    defaults = defaults or SamplingParams()
    created = int(time.time())
    app = FastAPI(title="loraforge", description="OpenAI-compatible API over a loraforge model")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request: {loc or 'body'}: {first.get('msg', 'malformed')}"
        return JSONResponse(APIError(400, message, param=loc or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN001, ANN202 - FastAPI middleware signature
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                err = APIError(401, "Incorrect API key provided. Send `Authorization: Bearer <key>` with the key "
                               "given to `loraforge api --api-key` (or API_KEY / LORAFORGE_API_KEY).", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": created, "owned_by": "loraforge"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.tools:
            raise APIError(400, "tools are not supported by `loraforge api` yet", param="tools")
        turns, system = to_conversation(req.messages)
        params, explicit = _sampling(req, defaults)
        thinking = req.enable_thinking
        if thinking is None and req.chat_template_kwargs:
            thinking = req.chat_template_kwargs.get("enable_thinking")
        prompt = await run_in_threadpool(engine.encode, turns, system=system, enable_thinking=thinking)
        try:
            params = engine.fit_params(prompt, params, max_tokens_explicit=explicit)
        except ContextLengthError as err:
            raise APIError(400, err.message, param="messages", code="context_length_exceeded") from None
        cid, model_name = f"chatcmpl-{uuid.uuid4().hex}", engine.model_id
        if not req.stream:
            done = await run_in_threadpool(engine.complete, prompt, params)
            message: dict[str, Any] = {"role": "assistant", "content": done.content}
            if done.reasoning is not None:
                message["reasoning_content"] = done.reasoning
            return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason,
                                 "logprobs": None}],
                    "usage": _usage(done.prompt_tokens, done.completion_tokens)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None,
                  choices: bool = True) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                    "model": model_name,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}] if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        stream = engine.stream(prompt, params)

        async def events():  # noqa: ANN202 - an async generator of SSE lines
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    delta = await run_in_threadpool(next, stream, None)
                    if delta is None:
                        break
                    key = "reasoning_content" if delta.kind == "reasoning" else "content"
                    yield chunk({key: delta.text})
                done = stream.completion
                yield chunk({}, finish=done.finish_reason if done else "stop")
                if include_usage and done is not None:
                    yield chunk({}, usage=_usage(done.prompt_tokens, done.completion_tokens), choices=False)
                yield "data: [DONE]\n\n"
            except Exception as err:  # noqa: BLE001 - the status line is sent already: report in the stream
                logger.exception("generation failed")
                yield f"data: {json.dumps(APIError(500, str(err), type='server_error').body())}\n\n"
            finally:
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(stream.close)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def serve(engine: ChatEngine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          defaults: SamplingParams | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(engine, api_key=api_key, defaults=defaults)
    auth = "bearer key required" if api_key else "no API key (anyone who can reach the port may use it)"
    print(f"loraforge api: serving {engine.model_id} at http://{host}:{port}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how `loraforge api` listens; see :func:`server_settings`."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def server_settings(*, host: str | None = None, port: int | None = None, api_key: str | None = None,
                    model_name: str | None = None, environ: Mapping[str, str]) -> ServerSettings:
    """The server's settings: command-line flags first, then LLaMA-Factory's environment variables (API_HOST,
    API_PORT, API_KEY, API_MODEL_NAME; LORAFORGE_API_KEY too), then the defaults (127.0.0.1:8000, no key).

    Raises :class:`~loraforge.errors.ConfigError` for a port that is not a number; warns (logging) when the
    server would be reachable from other machines without a key.
    """
    from ..errors import ConfigError

    def env(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    host_from = "--host" if host else "API_HOST" if env("API_HOST") else None
    host = host or env("API_HOST") or "127.0.0.1"
    if port is None and env("API_PORT"):
        try:
            port = int(env("API_PORT"))
        except ValueError:
            raise ConfigError([f"the environment variable API_PORT={env('API_PORT')!r} is not a port number; "
                               "set it to e.g. 8000, or pass --port"]) from None
    port = 8000 if port is None else port
    if not 0 < port < 65536:
        raise ConfigError([f"port {port} is out of range; use 1-65535 (--port or API_PORT)"])
    api_key = api_key or env("LORAFORGE_API_KEY") or env("API_KEY")
    model_name = model_name or env("API_MODEL_NAME")
    if host_from and not api_key and not is_loopback(host):
        logger.warning("%s=%s exposes the server to other machines and no API key is set: anyone who can reach "
                       "port %d can use the model. Set API_KEY (or --api-key) to require one.",
                       host_from, host, port)
    return ServerSettings(host=host, port=port, api_key=api_key, model_name=model_name)
