"""Write a :class:`TemplateSpec` as a Hugging Face Jinja chat template that renders what training used.

The generated template follows :mod:`loraforge.data.render` rule for rule (tests compare the two over many
conversations). It reads the usual ``apply_chat_template`` inputs: ``messages`` (system first, assistant
``tool_calls``, ``tool`` results, ``reasoning_content``), ``tools``, ``add_generation_prompt``, and for thinking
templates ``enable_thinking`` (its default is the mode training used).
"""

from __future__ import annotations

import json

from .template_spec import Slot, TemplateSpec


def _lit(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return json.dumps(text, ensure_ascii=False)


def _expr(slot: Slot, **values: str) -> str:
    """A Jinja expression concatenating the slot's pieces; placeholders become the given expressions."""
    values = {"bos_token": "_bos", "eos_token": "_eos", **values}
    parts = [_lit(p) if isinstance(p, str) else values.get(p.name, "''") for p in slot.pieces]
    merged: list[str] = []
    for part in parts:  # keep the output short: join adjacent literals
        if merged and merged[-1].startswith('"') and part.startswith('"'):
            merged[-1] = _lit(json.loads(merged[-1]) + json.loads(part))
        else:
            merged.append(part)
    return "(" + " + ".join(merged) + ")" if merged else "''"


def _bool(value: bool | None) -> str:
    return "none" if value is None else ("true" if value else "false")


def build_jinja(spec: TemplateSpec, *, default_system: str | None = None, enable_thinking: bool | None = True,
                keep_reasoning_history: bool = False) -> str:
    """The Jinja chat template of ``spec`` with the given rendering options baked in as defaults."""
    think = spec.thinking
    hybrid = think.mode == "hybrid" and not spec.reasoning_in_slot
    system_default = default_system if default_system is not None else spec.default_system
    user_has_system = "system" in spec.user.fields
    out: list[str] = [f"{{#- loraforge template `{spec.name}`: generated from its definition; it renders exactly "
                      "what loraforge trained on. -#}"]
    add = out.append
    if hybrid:
        add(f"{{%- if enable_thinking is not defined %}}{{%- set enable_thinking = {_bool(enable_thinking)} %}}"
            "{%- endif %}")
    add("{%- set _bos = bos_token if bos_token is defined and bos_token is string else '' %}")
    add("{%- set _eos = eos_token if eos_token is defined and eos_token is string else '' %}")
    add(f"{{%- set ns = namespace(system={_lit(system_default)}, last_query=-1, first_user=-1, last_user=-1, "
        "found=false, calls='', tools='') %}")
    add("{%- if messages and messages[0].role == 'system' %}{%- set loop_messages = messages[1:] %}"
        "{%- if messages[0].content %}{%- set ns.system = messages[0].content %}{%- endif %}"
        "{%- else %}{%- set loop_messages = messages %}{%- endif %}")
    if spec.strip_content:
        add("{%- set ns.system = ns.system | trim %}")
    if spec.tools is not None:
        t = spec.tools
        add("{%- if tools %}{%- for tool in tools %}")
        if t.wrap:
            add("{%- if tool.type is defined and tool.type == 'function' %}{%- set _tool = tool %}"
                "{%- else %}{%- set _tool = {'type': 'function', 'function': tool} %}{%- endif %}")
        else:
            add("{%- set _tool = tool %}")
        add(f"{{%- set ns.tools = ns.tools + {_expr(t.item, tool='(_tool | tojson)')} %}}{{%- endfor %}}")
        block = _expr(t.system, tools="ns.tools")
        add(f"{{%- if ns.system %}}{{%- set ns.system = ns.system + {_lit(t.separator)} + {block} %}}"
            f"{{%- else %}}{{%- set ns.system = {block} %}}{{%- endif %}}{{%- endif %}}")
    add("{%- set ns.last_query = (loop_messages | length) - 1 %}")
    add("{%- for m in loop_messages %}{%- if m.role == 'user' %}"
        "{%- if ns.first_user < 0 %}{%- set ns.first_user = loop.index0 %}{%- endif %}"
        "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}")
    skip = think.query_skip
    skip_test = (f" and not (m.content is string and m.content.startswith({_lit(skip[0])}) and "
                 f"m.content.endswith({_lit(skip[1])}))") if skip else ""
    add("{%- for m in loop_messages[::-1] %}"
        f"{{%- if not ns.found and m.role == 'user'{skip_test} %}}"
        "{%- set ns.found = true %}{%- set ns.last_query = (loop_messages | length) - 1 - loop.index0 %}"
        "{%- endif %}{%- endfor %}")
    if spec.prefix.pieces:
        add(f"{{{{- {_expr(spec.prefix)} }}}}")
    if spec.system_placement == "block" and not user_has_system:
        cond = "true" if spec.always_system else "ns.system"
        add(f"{{%- if {cond} %}}{{{{- {_expr(spec.system, content='ns.system')} }}}}{{%- endif %}}")
    add("{%- for m in loop_messages %}")
    add("{%- set content = m.content if m.content is string else '' %}")
    _user_branch(spec, add)
    _observation_branch(spec, add)
    _assistant_branch(spec, add, keep_reasoning_history or not think.drop_history)
    add("{%- endif %}{%- endfor %}")
    gen = _expr(spec.generation_prompt)
    tail = f"{{%- if enable_thinking is false %}}{{{{- {_lit(think.open + think.close)} }}}}{{%- endif %}}" \
        if hybrid else ""
    add(f"{{%- if add_generation_prompt %}}{{{{- {gen} }}}}{tail}{{%- endif %}}")
    return "\n".join(out) + "\n"


def _user_branch(spec: TemplateSpec, add) -> None:
    add("{%- if m.role == 'user' %}")
    if spec.strip_content:
        add("{%- set content = content | trim %}")
    if spec.system_placement in ("first_user", "last_user"):
        index = "ns.first_user" if spec.system_placement == "first_user" else "ns.last_user"
        add(f"{{%- if loop.index0 == {index} and ns.system %}}"
            f"{{%- set content = {_expr(spec.system, content='ns.system')} + content %}}{{%- endif %}}")
    add(f"{{{{- {_expr(spec.user, content='content', system='ns.system')} }}}}")


def _observation_branch(spec: TemplateSpec, add) -> None:
    add("{%- elif m.role == 'tool' %}")
    if spec.strip_content:
        add("{%- set content = content | trim %}")
    if spec.observation_open:
        add("{%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' %}"
            f"{{{{- {_lit(spec.observation_open)} }}}}{{%- endif %}}")
    add(f"{{{{- {_expr(spec.observation_slot, content='content')} }}}}")
    if spec.observation_close:
        add("{%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' %}"
            f"{{{{- {_lit(spec.observation_close)} }}}}{{%- endif %}}")


def _assistant_branch(spec: TemplateSpec, add, keep_history: bool) -> None:
    think = spec.thinking
    add("{%- elif m.role == 'assistant' %}")
    add(f"{{{{- {_expr(spec.generation_prompt)} }}}}")
    add("{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and "
        "m.reasoning_content is string else '' %}")
    if think.mode == "hybrid":
        open_tag, close_tag = (_lit(t) for t in think.tags)
        add(f"{{%- if not (m.reasoning_content is defined and m.reasoning_content is string) and {close_tag} "
            "in content %}"
            f"{{%- set reasoning = content.split({close_tag})[0].rstrip('\\n').split({open_tag})[-1].lstrip('\\n') %}}"
            f"{{%- set content = content.split({close_tag})[-1].lstrip('\\n') %}}{{%- endif %}}")
    if spec.strip_content:
        add("{%- set content = content | trim %}")
    add("{%- set ns.calls = '' %}")
    if spec.tools is not None:
        t = spec.tools
        add("{%- if m.tool_calls is defined and m.tool_calls %}{%- for tc in m.tool_calls %}"
            "{%- set f = tc.function if tc.function is defined else tc %}"
            "{%- set args = f.arguments if f.arguments is string else (f.arguments | tojson) %}"
            f"{{%- if not loop.first %}}{{%- set ns.calls = ns.calls + {_lit(t.call_separator)} %}}{{%- endif %}}"
            f"{{%- set ns.calls = ns.calls + {_expr(t.call, name='f.name', arguments='args')} %}}"
            "{%- endfor %}{%- endif %}")
    block = f"{_lit(think.open)} + reasoning.strip('\\n') + {_lit(think.close)}"
    if spec.reasoning_in_slot or think.mode == "drop":
        add("{%- set body = content %}")
    elif think.mode == "inline":
        add(f"{{%- if reasoning %}}{{%- set body = {block} + content.lstrip('\\n') %}}"
            "{%- else %}{%- set body = content %}{%- endif %}")
    else:
        add("{%- if enable_thinking is false %}{%- set reasoning = '' %}{%- endif %}")
        add(f"{{%- if ({_bool(keep_history)} or loop.index0 > ns.last_query) and (loop.last or reasoning) %}}"
            f"{{%- set body = {block} + content.lstrip('\\n') %}}{{%- else %}}{{%- set body = content %}}"
            "{%- endif %}")
    if spec.tools is not None:
        sep = _lit(spec.tools.call_separator)
        add(f"{{%- if ns.calls %}}{{%- if content %}}{{%- set body = body + {sep} %}}{{%- endif %}}"
            "{%- set body = body + ns.calls %}{%- endif %}")
    function = spec.function_slot
    add("{%- if ns.calls %}" + f"{{{{- {_expr(function, content='body', reasoning='reasoning')} }}}}"
        + "{%- else %}" + f"{{{{- {_expr(spec.assistant, content='body', reasoning='reasoning')} }}}}"
        + "{%- endif %}")
