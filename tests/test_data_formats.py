"""alpaca / sharegpt / openai rows -> Conversation, and how bad rows are reported."""

from __future__ import annotations

import json

import pytest

from loraforge.data.conversation import Message
from loraforge.data.formats import RowProblem, convert_row
from loraforge.data.readers import RawRow
from loraforge.data.registry import parse_entry

SHAREGPT = parse_entry("s", {"file_name": "s.json", "formatting": "sharegpt",
                             "columns": {"messages": "conversations", "system": "system", "tools": "tools"}})
OPENAI = parse_entry("o", {"file_name": "o.json", "formatting": "openai"})


def _conv(data, attr, **kw):
    return convert_row(RawRow(data, "f.json", 7), attr, **kw)


def _problem(data, attr, **kw) -> RowProblem:
    with pytest.raises(RowProblem) as err:
        _conv(data, attr, **kw)
    return err.value


def test_alpaca_joins_input_and_carries_history_system_reasoning():
    attr = parse_entry("a", {"file_name": "a.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "sys",
        "reasoning": "cot"}})
    conv = _conv({"instruction": "Translate", "input": "你好", "output": "Hello", "sys": "Be exact.",
                  "history": [["hi", "hey"]], "cot": "It is a greeting."}, attr)
    assert conv.system == "Be exact."
    assert conv.messages == [Message("user", "hi"), Message("assistant", "hey"), Message("user", "Translate\n你好"),
                             Message("assistant", "Hello", reasoning="It is a greeting.")]
    assert conv.source == "a: f.json:row 7"
    assert _conv({"instruction": "Only", "input": "", "output": "x"}, attr).messages[0].content == "Only"


@pytest.mark.parametrize("row,field", [
    ({"input": "x", "output": "y"}, "instruction"),
    ({"instruction": "x"}, "output"),
    ({"instruction": "x", "output": "  "}, "output"),
    ({"instruction": "", "input": "", "output": "y"}, "instruction"),
    ({"instruction": ["x"], "output": "y"}, "instruction"),
    ({"instruction": "x", "output": ["a", "b"]}, "output"),
])
def test_alpaca_problems_name_the_field(row, field):
    assert _problem(row, parse_entry("a", {"file_name": "a.json"})).field == field


def test_alpaca_pretraining_text_needs_no_answer():
    attr = parse_entry("c4", {"file_name": "c4.jsonl", "columns": {"prompt": "text"}})
    conv = _conv({"text": "Plain text."}, attr, require_answer=False)
    assert [m.content for m in conv.messages] == ["Plain text."]


def test_sharegpt_system_message_tools_and_function_roles():
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    conv = _conv({"conversations": [
        {"from": "system", "value": "You add."},
        {"from": "human", "value": "1+2?"},
        {"from": "function_call", "value": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"from": "observation", "value": "3"},
        {"from": "gpt", "value": "It is 3."}], "tools": tools}, SHAREGPT)
    assert conv.system == "You add."
    assert [m.role for m in conv.messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(conv.messages[1].content) == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert json.loads(conv.tools) == tools


@pytest.mark.parametrize("messages,field,text", [
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], "conversations[0]", "alternate"),
    ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}], "conversations[1]", "alternate"),
    ([{"from": "human", "value": "x"}], "conversations[0]", "no answer"),
    ([{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}], "conversations[1].from", "unknown role"),
    ([{"from": "human"}, {"from": "gpt", "value": "y"}], "conversations[0].value", "missing"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}], "conversations[1]", "empty answer"),
    ([{"from": "human", "value": "x"}, {"from": "system", "value": "s"}], "conversations[1].from", "only allowed"),
])
def test_sharegpt_problems_name_the_message(messages, field, text):
    err = _problem({"conversations": messages}, SHAREGPT)
    assert err.field == field and text in err.message


def test_sharegpt_missing_column_lists_what_the_row_has():
    err = _problem({"messages": []}, SHAREGPT)
    assert err.field == "conversations" and "messages" in err.message


def test_openai_tool_calls_reasoning_and_merged_tool_results():
    conv = _conv({"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Paris"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Paris\"}"}},
            {"type": "function", "function": {"name": "t", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"},
        {"role": "assistant", "content": "Sunny, 20C.", "reasoning_content": "Combine both."}],
        "tools": [{"type": "function", "function": {"name": "w"}}]}, OPENAI)
    assert conv.system == "sys"
    assert [m.role for m in conv.messages] == ["user", "function", "observation", "assistant"]
    assert conv.messages[0].content == "weather in Paris"
    assert json.loads(conv.messages[1].content) == [{"name": "w", "arguments": {"city": "Paris"}},
                                                    {"name": "t", "arguments": {}}]
    assert conv.messages[2].content == "sunny\n20C"
    assert conv.messages[3].reasoning == "Combine both."
    assert json.loads(conv.tools)[0]["function"]["name"] == "w"


def test_openai_bad_arguments_json_is_reported():
    err = _problem({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "w", "arguments": "{bad"}}]}]}, OPENAI)
    assert err.field == "messages[1].tool_calls[0].function.arguments"
