"""Chat templates: one registry of plain definitions, and the :class:`Template` that renders and tokenizes.

    template = resolve_template(cfg.data, tokenizer)     # `template`, a YAML path, `prompt_template`, or derived
    template.apply_to_tokenizer(tokenizer)               # EOS/pad + a Jinja chat_template rendering the same text
    input_ids, labels = template.encode(conv, tokenizer, cutoff_len=2048)

Built-in definitions are the YAML files in ``data/template_defs/`` (``_tool_styles.yaml`` holds the shared
tool formats). Rendering rules: :mod:`.render`; Jinja export: :mod:`.template_jinja`; tokenization and
truncation: :mod:`.template_encode`; plain-text prompt templates: :mod:`.prompt_template`; matching a
tokenizer's own chat template: :mod:`.template_match`. See docs/templates.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..errors import TemplateError
from .conversation import Conversation
from .render import RenderOptions, Turn, render_text, render_turns
from .render import split_reasoning as _split_reasoning
from .template_encode import build_example, tokenize_many, tokenize_turns
from .template_jinja import build_jinja
from .template_spec import TemplateSpec, ToolSpec, parse_spec, parse_tool_spec
from .template_tokenizer import NAME as TOKENIZER_KIND
from .template_tokenizer import TokenizerTemplate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    """A template definition plus the data options that change what it renders.

    ``enable_thinking`` here is the mode training used: it is the default of the exported Jinja template;
    :meth:`encode` and :meth:`encode_prompt` take the mode per call.
    """

    spec: TemplateSpec
    default_system: str | None = None  # overrides spec.default_system (config `default_system`)
    enable_thinking: bool | None = True
    keep_reasoning_history: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def supports_thinking(self) -> bool:
        """True for hybrid thinking templates, where ``enable_thinking`` changes the rendering."""
        return self.spec.thinking.mode == "hybrid"

    @property
    def thought_words(self) -> tuple[str, str]:
        """The reasoning tags, e.g. ("<think>", "</think>"), for splitting generated text."""
        return self.spec.thinking.tags

    def options(self, tokenizer: Any = None, *, enable_thinking: bool | None = True) -> RenderOptions:
        """The :class:`RenderOptions` for ``tokenizer`` (its BOS/EOS fill ``{bos_token}``/``{eos_token}``)."""
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
        eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
        return RenderOptions(enable_thinking=enable_thinking, keep_reasoning_history=self.keep_reasoning_history,
                             default_system=self.default_system, bos_token=bos if isinstance(bos, str) else "",
                             eos_token=eos if isinstance(eos, str) else "")

    def render(self, conv: Conversation, tokenizer: Any = None, *, enable_thinking: bool | None = True,
               for_generation: bool = False) -> list[Turn]:
        """The conversation as text turns (prompt, answer); see :mod:`loraforge.data.render`."""
        return render_turns(self.spec, conv, self.options(tokenizer, enable_thinking=enable_thinking),
                            for_generation=for_generation)

    def render_text(self, conv: Conversation, tokenizer: Any = None, *, enable_thinking: bool | None = True,
                    for_generation: bool = False) -> str:
        """The conversation as one string, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        return render_text(self.spec, conv, self.options(tokenizer, enable_thinking=enable_thinking),
                           for_generation=for_generation)

    def encode(self, conv: Conversation, tokenizer: Any, *, cutoff_len: int, train_on_prompt: bool = False,
               mask_history: bool = False, enable_thinking: bool | None = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a training conversation; prompt tokens are -100 unless ``train_on_prompt``.

        Every answer is trained (only the last with ``mask_history``); longer examples are cut to
        ``cutoff_len`` turn by turn. Raises :class:`TemplateError` for a conversation it cannot render.
        """
        pairs = tokenize_turns(tokenizer, self.render(conv, tokenizer, enable_thinking=enable_thinking))
        return build_example(pairs, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt,
                             mask_history=mask_history)

    def encode_batch(self, convs: Sequence[Conversation], tokenizer: Any, *, cutoff_len: int,
                     train_on_prompt: bool = False, mask_history: bool = False,
                     enable_thinking: bool | None = True) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode` for many conversations with one batched tokenizer call (raises on the first bad one)."""
        opts = self.options(tokenizer, enable_thinking=enable_thinking)
        rendered = [render_turns(self.spec, conv, opts) for conv in convs]
        return [build_example(pairs, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt,
                              mask_history=mask_history) for pairs in tokenize_many(tokenizer, rendered)]

    def encode_prompt(self, conv: Conversation, tokenizer: Any, *, enable_thinking: bool | None = True) -> list[int]:
        """Token ids of the prompt up to and including the generation prompt (``conv`` ends with a user or
        observation message), for predict, chat and the API server."""
        text = self.render_text(conv, tokenizer, enable_thinking=enable_thinking, for_generation=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """EOS and the template's stop words that the tokenizer knows as single tokens, without duplicates."""
        ids: list[int] = []
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        for word in self.spec.stop_words:
            token_id = vocab.get(word)
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
        return ids

    def to_jinja(self) -> str:
        """A Jinja chat template that renders exactly what :meth:`render_text` does (tools and thinking
        included); ``enable_thinking`` defaults to the mode this template was resolved with."""
        return build_jinja(self.spec, default_system=self.default_system, enable_thinking=self.enable_thinking,
                           keep_reasoning_history=self.keep_reasoning_history)

    def apply_to_tokenizer(self, tokenizer: Any) -> int:
        """Set the tokenizer's EOS (templates with ``replace_eos``), pad (EOS when unset) and chat_template, so a
        saved tokenizer renders what training used. Returns the number of tokens added to the vocabulary (0
        unless the EOS word was missing; then the embeddings must be resized)."""
        added = 0
        if self.spec.replace_eos and tokenizer.eos_token != self.spec.stop_words[0]:
            word = self.spec.stop_words[0]
            added += tokenizer.add_special_tokens({"eos_token": word})
            logger.info("template %s: EOS token set to %s", self.name, word)
        if tokenizer.eos_token is None:
            added += tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
            logger.info("template %s: the tokenizer had no EOS token; added <|endoftext|>", self.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if added:
            logger.warning("template %s added %d token(s) to the vocabulary; the model's embeddings must be "
                           "resized (resize_vocab: true)", self.name, added)
        tokenizer.chat_template = self.to_jinja()
        return added

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        """Split generated ``<think>reasoning</think>answer`` into (reasoning, answer); (None, text) when the
        text has no reasoning block."""
        return _split_reasoning(text, self.spec.thinking)


# --- the registry ------------------------------------------------------------------------------------------

_REGISTRY: dict[str, TemplateSpec] = {}
_TOOL_STYLES: dict[str, ToolSpec] = {}
_BUILTINS_LOADED = False


def _defs_dir():
    return resources.files("loraforge.data") / "template_defs"


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TemplateError(f"{where}: not valid YAML ({err})") from None


def tool_styles() -> dict[str, ToolSpec]:
    """The named tool formats (``tools: qwen`` in a definition, ``tool_format`` in the config)."""
    if not _TOOL_STYLES:
        entry = _defs_dir() / "_tool_styles.yaml"
        data = _read_yaml(entry.read_text(encoding="utf-8"), str(entry)) or {}
        for style, body in data.items():
            _TOOL_STYLES[style] = dataclasses.replace(parse_tool_spec(body, f"{entry} ({style})"), style=style)
    return _TOOL_STYLES


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    entries = sorted((e for e in _defs_dir().iterdir() if e.name.endswith(".yaml") and not e.name.startswith("_")),
                     key=lambda e: e.name)
    for entry in entries:
        data = _read_yaml(entry.read_text(encoding="utf-8"), str(entry))
        register_template(parse_spec(data, where=f"template_defs/{entry.name}", tool_styles=tool_styles()))


def register_template(definition: TemplateSpec | Mapping[str, Any]) -> TemplateSpec:
    """Add a template (a :class:`TemplateSpec` or a definition mapping as in the YAML files) to the registry.
    Raises :class:`TemplateError` when the name is taken."""
    _load_builtins()
    spec = definition if isinstance(definition, TemplateSpec) else \
        parse_spec(definition, where="register_template()", tool_styles=tool_styles())
    if spec.name in _REGISTRY:
        raise TemplateError(f"template `{spec.name}` is already registered (from {_REGISTRY[spec.name].source})",
                            hint="choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def template_names() -> list[str]:
    """Names of the registered templates, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def describe_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered template, for help texts."""
    _load_builtins()
    return [(name, spec.description) for name, spec in _REGISTRY.items()]


def get_template(name: str) -> Template:
    """The registered template ``name`` (default options). Unknown names raise :class:`TemplateError` listing
    the known ones and the closest match."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise TemplateError(f"unknown template `{name}`",
                            hint=f"{hint}known templates: {', '.join(_REGISTRY)}; `tokenizer` (the model's own chat "
                                 "template); or a path to a template YAML")
    return Template(_REGISTRY[name])


def load_template_file(path: str | Path) -> Template:
    """A user-defined template from a YAML file (its ``name`` defaults to the file name); not registered."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TemplateError(f"template file {path} does not exist", hint="check the `template:` path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(f"cannot read template file {path}: {err}") from None
    return Template(parse_spec(_read_yaml(text, str(path)), where=str(path), name=path.stem,
                               tool_styles=tool_styles()))


def _with_tool_format(spec: TemplateSpec, tool_format: str | None) -> TemplateSpec:
    if not tool_format or (spec.tools is not None and spec.tools.style == tool_format):
        return spec
    styles = tool_styles()
    if tool_format not in styles:
        raise TemplateError(f"unknown `tool_format: {tool_format}`", hint=f"known tool formats: {', '.join(styles)}")
    return dataclasses.replace(spec, tools=styles[tool_format])


# LLaMA-Factory's names for the families loraforge has reference chat templates for, where they differ from
# loraforge's own names (`qwen`, `qwen3`, `qwen3_nothink`, `llama3`, `gemma`, `smollm2` are the same in both).
# Each maps to the named template that renders like that family, or to `tokenizer` (the model's own template).
TEMPLATE_ALIASES = {
    "ministral": "mistral",  # LLaMA-Factory's Mistral v3 "tekken" layout = Mistral Nemo
    "gemma2": "gemma",
    "smollm3": TOKENIZER_KIND,  # SmolLM3's system block depends on the thinking mode: no named template
    "qwq": TOKENIZER_KIND,  # QwQ's generation prompt opens the think block: no named template
}


def known_template_names() -> list[str]:
    """Every name `template:` accepts: the registered templates, `tokenizer`, and LLaMA-Factory's aliases."""
    return template_names() + [TOKENIZER_KIND] + list(TEMPLATE_ALIASES)


def resolve_template(data_args: Any, tokenizer: Any) -> "Template | TokenizerTemplate":
    """The template a run uses: ``prompt_template``, else ``template`` (a name, an alias, `tokenizer`, or a YAML
    path), else the named template whose rendering matches ``tokenizer.chat_template``, else the model's own chat
    template (`tokenizer`). Logs which one was chosen when it was derived, and warns when an explicitly chosen
    template renders differently from the model's own chat template."""
    from .prompt_template import prompt_template_spec
    from .template_match import derive_template, describe_mismatch

    prompt_template = getattr(data_args, "prompt_template", None)
    name = getattr(data_args, "template", None)
    if name in TEMPLATE_ALIASES:
        logger.info("template: `%s` is loraforge's `%s`", name, TEMPLATE_ALIASES[name])
        name = TEMPLATE_ALIASES[name]
    if not prompt_template and name == TOKENIZER_KIND:
        return _tokenizer_kind(data_args, tokenizer, derived=False)
    if prompt_template:
        spec = prompt_template_spec(prompt_template)
        if getattr(tokenizer, "chat_template", None):
            logger.info("prompt_template replaces the model's chat template; the saved tokenizer will carry a "
                        "chat template that renders your format")
    elif name:
        is_path = name.endswith((".yaml", ".yml")) or (name not in template_names()
                                                        and Path(name).expanduser().is_file())
        spec = load_template_file(name).spec if is_path else get_template(name).spec
    else:
        try:
            spec = derive_template(tokenizer)
        except TemplateError as err:
            logger.info("template: %s", err.message)
            return _tokenizer_kind(data_args, tokenizer, derived=True)
    template = Template(
        _with_tool_format(spec, getattr(data_args, "tool_format", None)),
        default_system=getattr(data_args, "default_system", None),
        enable_thinking=getattr(data_args, "enable_thinking", True),
        keep_reasoning_history=bool(getattr(data_args, "keep_reasoning_history", False)))
    if name and not prompt_template:
        problem = describe_mismatch(Template(spec), tokenizer)
        if problem:
            logger.warning("template `%s` does not match the model's own chat template: %s (unset `template` or "
                           "set `template: tokenizer` to train with the model's own)", spec.name, problem)
    return template


def _tokenizer_kind(data_args: Any, tokenizer: Any, *, derived: bool) -> "TokenizerTemplate":
    """The `tokenizer` template, checked on probe conversations; says what it cannot render."""
    from .template_tokenizer import tokenizer_template

    for key in ("tool_format", "keep_reasoning_history"):
        if getattr(data_args, key, None):
            logger.warning("`%s` is ignored with `template: tokenizer`: the model's own chat template decides", key)
    template = tokenizer_template(tokenizer, default_system=getattr(data_args, "default_system", None),
                                  enable_thinking=getattr(data_args, "enable_thinking", True))
    check_tokenizer_template(template, tokenizer, derived=derived)
    return template


def check_tokenizer_template(template: "TokenizerTemplate", tokenizer: Any, *, derived: bool) -> None:
    """Encode the probe conversations of :mod:`.template_match` with ``template``: raise when a plain single- or
    multi-turn chat fails, log which kinds of conversation (system prompt, tools) the model's template refuses."""
    from .template_match import PROBES

    failures: list[tuple[str, str]] = []
    for probe in PROBES:
        try:
            template.encode(probe.conv, tokenizer, cutoff_len=1 << 30)
        except TemplateError as err:
            failures.append((probe.name, err.message.removeprefix("conversation: ")))
    basic = [f for f in failures if f[0] in ("single-turn", "multi-turn")]
    lead = "`template` is not set, no named template renders like the model's chat template, and " if derived else ""
    if basic:
        raise TemplateError(f"{lead}the model's own chat template cannot train a {basic[0][0]} chat: {basic[0][1]}",
                            hint="set `template:` to a named template or a template YAML (docs/templates.md)")
    logger.info("template: %susing the model's own chat template (`template: tokenizer`); check what is trained "
                "with `loraforge data preview CONFIG`, override with `template: NAME`",
                "no named template renders like the model's chat template; " if derived else "")
    for name, message in failures:
        logger.warning("template `tokenizer`: the model's chat template cannot train a conversation with a %s: %s",
                       name, message)
