"""Ollama Modelfile: the Go TEMPLATE, executed here by a small Go text/template interpreter, renders exactly
what the model's Jinja chat template renders; SYSTEM and one PARAMETER stop per stop token are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loraforge.export.modelfile import derive_chat_format, write_modelfile

# ------------------------------------------------------------------------------------------------------------
# A minimal Go text/template interpreter: enough for the constructs Ollama templates use (if/else if/else/end,
# range with index variables, := and =, eq/ne/and/or/not/len/slice, .Field, $.Field, $var, trim markers).
# ------------------------------------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = src[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        head = val.split(" ", 1)[0]
        if head in stop or val.startswith("else"):
            return nodes, i, val
        if head == "if":
            branches, else_body = [], []
            cond = val[3:]
            while True:
                body, i, ended = _parse(tokens, i + 1, ("end",))
                branches.append((cond, body))
                if ended.startswith("else if "):
                    cond = ended[len("else if "):]
                    continue
                if ended == "else":
                    else_body, i, ended = _parse(tokens, i + 1, ("end",))
                break
            nodes.append(("if", branches, else_body))
            i += 1
        elif head == "range":
            spec = val[6:]
            names, expr = ([n.strip() for n in spec.split(":=")[0].split(",")], spec.split(":=", 1)[1]) \
                if ":=" in spec else ([], spec)
            body, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", names, expr, body))
            i += 1
        elif re.match(r"^\$\w+\s*:?=", val):
            name, expr = re.split(r"\s*:?=\s*", val, maxsplit=1)
            nodes.append(("set", name, expr))
            i += 1
        else:
            nodes.append(("out", val))
            i += 1
    return nodes, i, ""


def _words(expr: str) -> list:
    toks = re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)
    stack: list[list] = [[]]
    for t in toks:
        if t == "(":
            stack.append([])
        elif t == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(t)
    return stack[0]


def _truthy(v) -> bool:
    return bool(v)


def _value(tok, dot, env):
    if isinstance(tok, list):
        return _call(tok, dot, env)
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if tok in ("true", "false"):
        return tok == "true"
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        obj = env[name]
    else:
        obj, path = dot, tok[1:]
    for part in filter(None, path.split(".")):
        obj = obj[part]
    return obj


def _call(words: list, dot, env):
    fn, args = words[0], words[1:]
    funcs = {
        "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
        "and": lambda *a: all(_truthy(x) for x in a), "or": lambda *a: any(_truthy(x) for x in a),
        "len": len, "slice": lambda a, i, j=None: a[i:j],
    }
    if isinstance(fn, str) and fn in funcs:
        return funcs[fn](*[_value(a, dot, env) for a in args])
    assert not args, f"unsupported call {words}"
    return _value(fn, dot, env)


def _exec(nodes: list, dot, env: dict) -> str:
    out = []
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(str(_call(_words(node[1]), dot, env)))
        elif kind == "set":
            env[node[1]] = _call(_words(node[2]), dot, env)
        elif kind == "if":
            for cond, body in node[1]:
                if _truthy(_call(_words(cond), dot, env)):
                    out.append(_exec(body, dot, env))
                    break
            else:
                out.append(_exec(node[2], dot, env))
        elif kind == "range":
            for idx, item in enumerate(_call(_words(node[2]), dot, env)):
                scope = dict(env)
                if len(node[1]) == 2:
                    scope[node[1][0]], scope[node[1][1]] = idx, item
                elif len(node[1]) == 1:
                    scope[node[1][0]] = item
                out.append(_exec(node[3], item, scope))
    return "".join(out)


def render_go(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """Execute an Ollama TEMPLATE the way Ollama does: .System plus .Messages (Role/Content)."""
    data = {"System": system or "", "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    nodes, _, _ = _parse(_lex(template))
    return _exec(nodes, data, {"$": data})


# ------------------------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hello! 你好 👋"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Write code:\nprint(1)"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer one"},
     {"role": "user", "content": "second"}, {"role": "assistant", "content": "answer two"},
     {"role": "user", "content": "third"}],
]


def _jinja(tokenizer, messages) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # a BOS the tokenizer adds itself: llama.cpp / Ollama add it from the GGUF metadata
    return text


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.mark.parametrize("name, family, has_default_system", [
    ("Qwen-Qwen3-0.6B.jinja", "chatml", False),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "chatml", True),
    ("Qwen-QwQ-32B.jinja", "chatml", False),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3", False),
])
def test_go_template_renders_like_jinja(qwen_tokenizer, chat_templates_dir: Path, name, family, has_default_system):
    tok = qwen_tokenizer
    tok.chat_template = (chat_templates_dir / name).read_text(encoding="utf-8")
    fmt = derive_chat_format(tok)
    assert fmt is not None and fmt.family.name == family
    assert (fmt.default_system is not None) == has_default_system
    go = fmt.go_template()
    for conv in CONVERSATIONS:
        system = next((m["content"] for m in conv if m["role"] == "system"), fmt.default_system)
        assert render_go(go, system, conv) == _jinja(tok, conv), (name, conv)


def test_llama31_preamble_and_qwen25_default_system(qwen_tokenizer, chat_templates_dir: Path):
    tok = qwen_tokenizer
    tok.chat_template = (chat_templates_dir / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text(encoding="utf-8")
    fmt = derive_chat_format(tok)
    assert fmt.preamble == "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    tok.chat_template = (chat_templates_dir / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    fmt = derive_chat_format(tok)
    assert fmt.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.mark.parametrize("name", ["google-gemma-2-2b-it.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja"])
def test_unsupported_layout_gets_no_template(qwen_tokenizer, chat_templates_dir: Path, tmp_path: Path, name):
    tok = qwen_tokenizer
    tok.chat_template = (chat_templates_dir / name).read_text(encoding="utf-8")
    assert derive_chat_format(tok) is None
    write_modelfile(tmp_path / "Modelfile", "m.gguf", tok, [151645])
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m.gguf" in text and "\nTEMPLATE" not in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_smollm2_modelfile(smollm2_path: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    fmt = write_modelfile(tmp_path / "Modelfile", "smol-q8_0.gguf", tok, [2])
    text = (tmp_path / "Modelfile").read_text()
    assert fmt is not None and fmt.family.name == "chatml"
    assert text.splitlines()[1] == "FROM ./smol-q8_0.gguf"
    assert 'SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"' in text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == ["<|im_start|>", "<|im_end|>"]  # eos id 2 is <|im_end|>: listed once
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for conv in CONVERSATIONS:
        system = next((m["content"] for m in conv if m["role"] == "system"), fmt.default_system)
        assert render_go(template, system, conv) == _jinja(tok, conv)


def test_configured_default_system_wins(qwen_tokenizer, chat_templates_dir: Path, tmp_path: Path):
    tok = qwen_tokenizer
    tok.chat_template = (chat_templates_dir / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    write_modelfile(tmp_path / "Modelfile", "q.gguf", tok, [151645, 151643], default_system="Answer in French.\nBe brief.")
    text = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """Answer in French.\nBe brief."""' in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _llama3_like_tokenizer(base):
    """A tokenizer that, like Llama 3's, has <|begin_of_text|> as BOS and adds it to every encoding."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(base)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("name", ["smollm2", "qwen", "qwen3", "chatml", "llama3"])
def test_loraforge_training_templates(qwen_tokenizer, smollm2_path: Path, name):
    """The chat templates loraforge trains with (and saves with the adapter) get an exact Go equivalent."""
    from transformers import AutoTokenizer

    from loraforge.data import templates

    # SmolLM2's tokenizer names <|im_start|> as its BOS without adding it: the template must not be clipped.
    tok = AutoTokenizer.from_pretrained(str(smollm2_path)) if name == "smollm2" else qwen_tokenizer
    if name == "llama3":
        tok = _llama3_like_tokenizer(qwen_tokenizer)
    tok.chat_template = templates.get_template(name).to_jinja()
    fmt = derive_chat_format(tok)
    assert fmt is not None, name
    for conv in CONVERSATIONS:
        system = next((m["content"] for m in conv if m["role"] == "system"), fmt.default_system)
        assert render_go(fmt.go_template(), system, conv) == _jinja(tok, conv), (name, conv)
