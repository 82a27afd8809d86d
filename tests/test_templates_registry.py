"""The template registry, user-defined YAML templates, plain-text prompt templates and resolve_template."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraforge.config.data import DataArguments
from loraforge.data.conversation import Conversation, Message
from loraforge.data.prompt_template import prompt_template_spec
from loraforge.data.templates import (Template, describe_templates, get_template, load_template_file,
                                      register_template, resolve_template, template_names)
from loraforge.errors import TemplateError

REQUIRED = ["qwen", "qwen3", "qwen3_nothink", "chatml", "llama3", "mistral", "gemma", "alpaca", "default", "empty"]
UNSLOTH = ("Below is an instruction that describes a task, paired with a question. Write a response.\n\n"
           "### Instruction:\n{instruction}\n\n### Question:\n{question}\n\n### Response:\n<think>\n{reasoning}\n"
           "</think>\n{answer}{eos_token}")


class Tok:
    bos_token, eos_token = None, "<|im_end|>"
    chat_template = None


def test_required_templates_are_registered_with_descriptions():
    names = template_names()
    assert set(REQUIRED) <= set(names)
    described = dict(describe_templates())
    assert all(described[name] for name in REQUIRED)
    assert "thinking" in described["qwen3"]


def test_validate_accepts_every_registered_name():
    from loraforge.config import load_config
    from loraforge.data.templates import known_template_names

    assert set(template_names()) | {"tokenizer", "gemma2", "ministral"} <= set(known_template_names())
    for name in known_template_names():  # the commands pass these names (aliases included) to config validation
        load_config({"model_name_or_path": "x", "template": name}, purpose="chat",
                    template_names=known_template_names())


def test_register_rejects_duplicates_and_validates():
    with pytest.raises(TemplateError, match="`qwen3` is already registered"):
        register_template({"name": "qwen3", "user": "{content}", "assistant": "{content}"})
    spec = register_template({"name": "test_registry_demo", "user": "U: {content}\n", "generation_prompt": "A: ",
                              "assistant": "{content}{eos_token}\n", "description": "demo"})
    assert "test_registry_demo" in template_names() and spec.description == "demo"
    with pytest.raises(TemplateError, match="already registered"):
        register_template(spec)
    with pytest.raises(TemplateError, match="`user` must contain the placeholder {content}"):
        register_template({"name": "test_registry_bad", "user": "no placeholder"})


def test_unknown_template_lists_names_and_closest_match():
    with pytest.raises(TemplateError) as info:
        get_template("qwen2")
    text = str(info.value)
    assert "unknown template `qwen2`" in text and "did you mean `qwen`" in text
    assert all(name in text for name in REQUIRED)


def test_user_yaml_template(tmp_path):
    path = tmp_path / "mytpl.yaml"
    path.write_text('description: my chat format\nsystem: "<sys>{content}</sys>\\n"\nuser: "<u>{content}</u>\\n"\n'
                    'generation_prompt: "<a>"\nassistant: "{content}</a>{eos_token}\\n"\nstop_words: ["</a>"]\n')
    t = load_template_file(path)
    assert t.name == "mytpl" and t.description == "my chat format"
    conv = Conversation([Message("user", "hi {not a field}"), Message("assistant", "yo")], system="S")
    assert t.render_text(conv, Tok()) == "<sys>S</sys>\n<u>hi {not a field}</u>\n<a>yo</a><|im_end|>\n"
    resolved = resolve_template(DataArguments(template=str(path)), Tok())
    assert resolved.spec == t.spec


@pytest.mark.parametrize("body,match", [
    ("usr: '{content}'\n", "(?s)unknown field `usr`.*did you mean `user`"),
    ("user: 3\n", "field `user` must be a str"),
    ("user: 'no field'\n", "`user` must contain the placeholder"),
    ("thinking: {mode: sometimes}\n", "thinking.mode: sometimes"),
    ("tools: hermes\n", "unknown tool style `tools: hermes`"),
    ("system_placement: everywhere\n", "system_placement: everywhere"),
    ("replace_eos: true\n", "needs `stop_words`"),
    ("user: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_templates_name_file_and_field(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TemplateError, match=match) as info:
        load_template_file(path)
    assert str(path) in str(info.value)


def test_missing_template_file():
    with pytest.raises(TemplateError, match="does not exist"):
        resolve_template(DataArguments(template="nowhere/x.yaml"), Tok())


def test_prompt_template_renders_and_masks_from_the_first_answer_placeholder():
    t = Template(prompt_template_spec(UNSLOTH))
    conv = Conversation([Message("user", "What is 2+2?"), Message("assistant", "4", reasoning="2+2=4")],
                        system="Answer math questions.")
    turns = t.render(conv, Tok())
    assert turns[0].prompt == ("Below is an instruction that describes a task, paired with a question. Write a "
                               "response.\n\n### Instruction:\nAnswer math questions.\n\n### Question:\nWhat is "
                               "2+2?\n\n### Response:\n<think>\n")
    assert turns[0].answer == "2+2=4\n</think>\n4<|im_end|>"
    # no reasoning: an empty block; no system prompt: default_system fills {instruction}
    plain = Conversation([Message("user", "Hi"), Message("assistant", "Hello")])
    text = Template(prompt_template_spec(UNSLOTH), default_system="Be nice.").render_text(plain, Tok())
    assert "### Instruction:\nBe nice.\n\n" in text and text.endswith("<think>\n\n</think>\nHello<|im_end|>")


def test_prompt_template_from_file_and_config(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Q: {question}\nA: {answer}{eos_token}", encoding="utf-8")
    t = resolve_template(DataArguments(prompt_template=str(path)), Tok())
    conv = Conversation([Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                         Message("assistant", "d")], system="ignored: no {instruction}")
    assert t.render_text(conv, Tok()) == "Q: a\nA: b<|im_end|>Q: c\nA: d<|im_end|>"
    literal = Template(prompt_template_spec("{{json}} Q: {question} A: {answer}"))
    assert literal.render_text(Conversation([Message("user", "x"), Message("assistant", "y")]), Tok()) == \
        "{json} Q: x A: y"


@pytest.mark.parametrize("text,match", [
    ("Q: {question} A: {}", "positional placeholder"),
    ("Q: {question} A: {response}", "unknown placeholder {response}"),
    ("Q: {question}", "must contain {answer} exactly once"),
    ("A: {answer} Q: {question}", "comes after the answer starts"),
    ("Q: {question!r} A: {answer}", "cannot carry a format spec"),
    ("no_such_file.txt", "neither a format string"),
])
def test_bad_prompt_templates(text, match):
    with pytest.raises(TemplateError, match=match):
        prompt_template_spec(text)


def test_resolve_applies_data_options():
    args = DataArguments(template="qwen3", enable_thinking=False, keep_reasoning_history=True,
                         default_system="Sys.")
    t = resolve_template(args, Tok())
    assert (t.name, t.enable_thinking, t.keep_reasoning_history, t.default_system) == ("qwen3", False, True, "Sys.")
    assert get_template("qwen3").default_system is None  # the registry is not modified


def test_tool_format_override():
    t = resolve_template(DataArguments(template="chatml", tool_format="qwen"), Tok())
    assert t.spec.tools is not None and t.spec.tools.style == "qwen"
    with pytest.raises(TemplateError, match="unknown `tool_format: glm4`"):
        resolve_template(DataArguments(template="chatml", tool_format="glm4"), Tok())


def test_unset_template_without_chat_template_uses_empty(caplog):
    t = resolve_template(SimpleNamespace(template=None, prompt_template=None), Tok())
    assert t.name == "empty" and "no chat template" in caplog.text
