"""`loraforge chat` and `loraforge api`: argument parsing only; the work is in chat.py, api.py and engine.py."""

from __future__ import annotations

import argparse
import os

OVERRIDES_HELP = "Any config key as key=value (e.g. adapter_name_or_path=saves/run max_new_tokens=256)."


def _load(args: argparse.Namespace, purpose: str):  # noqa: ANN202 - returns a RunConfig
    from ..config import load_config
    from ..data.templates import known_template_names

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # `loraforge chat model_name_or_path=...` without a file
    return load_config(config, overrides, purpose=purpose, build_training_args=False,
                       template_names=known_template_names())


def _thinking(args: argparse.Namespace) -> bool | None:
    return {"on": True, "off": False}.get(args.thinking)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat
    from .engine import SamplingParams, build_engine

    cfg = _load(args, "chat")
    engine = build_engine(cfg)
    return run_chat(engine, SamplingParams.from_config(cfg.generation), system=args.system,
                    enable_thinking=_thinking(args))


def cmd_api(args: argparse.Namespace) -> int:
    from .api import serve, server_settings
    from .engine import SamplingParams, build_engine

    settings = server_settings(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                               environ=os.environ)  # before loading the model: a bad API_PORT fails fast
    cfg = _load(args, "api")
    engine = build_engine(cfg, model_id=settings.model_name)
    if _thinking(args) is not None:
        engine.enable_thinking = bool(_thinking(args))
    serve(engine, host=settings.host, port=settings.port, api_key=settings.api_key,
          defaults=SamplingParams.from_config(cfg.generation))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config naming the model (model_name_or_path, optionally "
                   "adapter_name_or_path, template). May be left out when the keys are given as key=value.")
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="Qwen3-style reasoning on or off (default: enable_thinking from the config).")
    p.set_defaults(accepts_overrides=True)


def register(sub) -> None:
    """Add the `chat` and `api` subcommands."""
    p = sub.add_parser("chat", help="Chat with a model in the terminal (streamed, multi-turn).",
                       description="Chat in the terminal with a base model, base + adapter, or a merged model. "
                       "Commands at the prompt: exit, clear, /think, /no_think, /system TEXT. " + OVERRIDES_HELP)
    _common(p)
    p.add_argument("--system", default=None, help="System prompt (default: default_system from the config).")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("api", help="Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models).",
                       description="OpenAI-compatible HTTP server. Binds 127.0.0.1 unless --host (or API_HOST) "
                       "says otherwise. LLaMA-Factory's environment variables API_HOST, API_PORT, API_KEY and "
                       "API_MODEL_NAME are read too; flags win. " + OVERRIDES_HELP)
    _common(p)
    p.add_argument("--host", default=None, help="Address to bind (default: API_HOST, else 127.0.0.1: this "
                   "machine only; 0.0.0.0 exposes the server to the network, so set an API key).")
    p.add_argument("--port", type=int, default=None, help="Port to listen on (default: API_PORT, else 8000).")
    p.add_argument("--api-key", default=None, help="Require `Authorization: Bearer KEY` (default: the "
                   "LORAFORGE_API_KEY or API_KEY environment variable; none means no key is needed).")
    p.add_argument("--model-name", default=None, help="Model id reported by /v1/models (default: API_MODEL_NAME, "
                   "else the model folder name, plus the adapter's).")
    p.set_defaults(func=cmd_api)
