"""Proof with a real client: every exported GGUF type loads in llama.cpp (llama-cpp-python); f32/f16 exports
generate the same 32 greedy tokens as transformers; q8_0 agrees on the top-1 token at >= 95% of positions;
llama.cpp tokenizes like the HF tokenizer; the LoRA adapter GGUF reproduces the merged model; the embedded chat
template drives llama.cpp's chat completion.

Skipped when llama-cpp-python is not installed (CI builds it; see docs/export.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from loraforge.export.gguf import convert_to_gguf  # noqa: E402
from loraforge.export.gguf.lora import convert_lora_to_gguf  # noqa: E402
from loraforge.export.gguf.quantize import kquantize  # noqa: E402
from conftest import make_random_lora  # noqa: E402

MULTILINGUAL = ("Hello, 世界! 你好，今天天气怎么样？ 🎉👍🏽🇨🇳 naïve café — Straße\n"
                "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345\n"
                "\t<tag attr=\"x\">I'm DON'T  spaced   out</tag>\r\n  日本語 한국어 ")
TEXT = ("The history of the printing press begins in the fifteenth century. Johannes Gutenberg combined movable "
        "type, oil-based ink and a screw press. 印刷术 spread across Europe within decades, and books became "
        "cheaper: def count(words): return len(words.split()) # counting words in Python. ") * 2
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One compute thread for torch (and llama.cpp below): on a shared 2-core machine, spinning thread pools
    make these small models 10-20x slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_llama(path: Path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                           n_threads=1, n_threads_batch=1, **kw)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Argmax decoding straight from llama.cpp's logits (no sampler, no stop tokens)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model(torch.tensor([ids]), use_cache=True)
    past, nxt, toks = out.past_key_values, int(out.logits[0, -1].argmax()), []
    for _ in range(n):
        toks.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return toks


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


class Exported:
    """One source model, its tokenizer and transformers reference, and its GGUF files (made on demand)."""

    def __init__(self, src: Path, root: Path):
        from transformers import AutoTokenizer

        self.src, self.root = src, root
        self.tokenizer = AutoTokenizer.from_pretrained(str(src))
        self.model = hf_model(src)
        self.files: dict[str, Path] = {}

    def gguf(self, quant: str) -> Path:
        if quant not in self.files:
            out = self.root / f"{self.src.name}-{quant}.gguf"
            if quant in ("q5_k_m", "q6_k"):  # from the f16 file, as convert_to_gguf does for q4_k_m
                kquantize(self.gguf("f16"), out, quant)
            else:
                convert_to_gguf(self.src, out, quant)
            self.files[quant] = out
        return self.files[quant]

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3_path: Path, tmp_path_factory) -> Exported:
    return Exported(tiny_qwen3_path, tmp_path_factory.mktemp("tiny_gguf"))


@pytest.fixture(scope="module")
def smol(smollm2_path: Path, tmp_path_factory) -> Exported:
    return Exported(smollm2_path, tmp_path_factory.mktemp("smol_gguf"))


@pytest.fixture(params=["tiny", "smol"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_32_greedy_tokens_match_transformers(exported: Exported, quant: str):
    ids = exported.prompt_ids()
    expected = hf_greedy(exported.model, ids, 32)
    llm = load_llama(exported.gguf(quant))
    try:
        assert llama_greedy(llm, ids, 32) == expected
        # Teacher-forced as well: random tiny models repeat one token greedily, so also compare every position
        # of a long text (near-ties are the only way a correct file can differ, and f32 has none at this size).
        ids = exported.tokenizer(TEXT)["input_ids"]
        ref, got = hf_logits(exported.model, ids), llama_logits(llm, ids)
        assert (ref.argmax(-1) == got.argmax(-1)).mean() >= (1.0 if quant == "f32" else 0.98)
        assert np.abs(ref - got).max() < (1e-2 if quant == "f32" else 0.15) * max(1.0, np.abs(ref).max())
    finally:
        llm.close()


def test_q8_0_top1_agreement(exported: Exported):
    ids = exported.tokenizer(TEXT)["input_ids"]
    llm = load_llama(exported.gguf("q8_0"))
    try:
        agree = (hf_logits(exported.model, ids).argmax(-1) == llama_logits(llm, ids).argmax(-1)).mean()
    finally:
        llm.close()
    assert agree >= 0.95, f"q8_0 top-1 agreement {agree:.3f}"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_python_quantizers_match_llama_cpp_quantizer(smol: Exported, quant: str, tmp_path: Path):
    """Our Python q8_0/q4_0 agree with transformers as well as llama.cpp's own quantizer does (from f16)."""
    ids = smol.tokenizer(TEXT)["input_ids"]
    ref = hf_logits(smol.model, ids).argmax(-1)
    theirs = tmp_path / f"llama-cpp-{quant}.gguf"
    kquantize(smol.gguf("f16"), theirs, quant)
    agree = {}
    for name, path in (("ours", smol.gguf(quant)), ("llama.cpp", theirs)):
        llm = load_llama(path)
        try:
            agree[name] = (llama_logits(llm, ids).argmax(-1) == ref).mean()
        finally:
            llm.close()
    assert agree["ours"] >= agree["llama.cpp"] - 0.02, agree


def test_tokenization_matches_transformers(exported: Exported):
    tok = exported.tokenizer
    llm = load_llama(exported.gguf("f16"), vocab_only=True)
    try:
        assert llm.tokenize(MULTILINGUAL.encode(), add_bos=False, special=False) == \
            tok(MULTILINGUAL, add_special_tokens=False)["input_ids"]
        chat = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(chat.encode(), add_bos=True, special=True) == tok(chat)["input_ids"]  # BOS flag too
        ids = tok(MULTILINGUAL, add_special_tokens=False)["input_ids"]
        assert llm.detokenize(ids).decode("utf-8") == MULTILINGUAL
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_every_type_loads_and_runs(tiny: Exported, quant: str):
    path = tiny.gguf(quant)
    ids = tiny.tokenizer(TEXT)["input_ids"][:48]
    llm = load_llama(path)
    try:
        got = llama_logits(llm, ids)
        ftype = int(llm.metadata["general.file_type"])
    finally:
        llm.close()
    ref = hf_logits(tiny.model, ids)
    assert np.isfinite(got).all()
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr > (0.999 if quant in ("bf16", "q8_0") else 0.9), f"{quant}: logits correlation {corr:.4f}"
    import gguf

    assert ftype == int(getattr(gguf.LlamaFileType, {"bf16": "MOSTLY_BF16"}.get(quant, f"MOSTLY_{quant.upper()}")))


def test_llama_cpp_chats_with_the_embedded_template(smol: Exported):
    llm = load_llama(smol.gguf("f32"))
    try:
        assert llm.metadata["tokenizer.chat_template"] == smol.tokenizer.chat_template
        reply = llm.create_chat_completion(messages=QUESTION, max_tokens=24, temperature=0.0, top_k=1)
        text = reply["choices"][0]["message"]["content"]
    finally:
        llm.close()
    expected = smol.tokenizer.decode(hf_greedy(smol.model, smol.prompt_ids(), 24), skip_special_tokens=True)
    assert text.strip() and expected.startswith(text.strip())
    assert "Paris" in text


def _tiny_model(kind: str, tokenizer_dir: Path, out: Path, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def _lora(base: Path, out: Path) -> Path:
    return make_random_lora(base, out, seed=4, std=0.1)


@pytest.mark.parametrize("kind, extra", [
    ("llama", {"head_dim": 16, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),
])
def test_architectures_and_lora_adapter_match_transformers(smollm2_path: Path, tmp_path: Path, kind, extra):
    """Base GGUF == HF (q/k row order, biases, head_dim, llama3 RoPE); base GGUF + LoRA GGUF == merged HF model."""
    from peft import PeftModel

    src = _tiny_model(kind, smollm2_path, tmp_path / kind, **extra)
    adapter = _lora(src, tmp_path / "lora")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]
    base_ref = hf_logits(hf_model(src), ids)
    with torch.no_grad():
        merged = PeftModel.from_pretrained(hf_model(src), str(adapter)).merge_and_unload()
    merged_ref = hf_logits(merged, ids)
    base_gguf = convert_to_gguf(src, tmp_path / "base.gguf", "f32").path
    lora_gguf = convert_lora_to_gguf(adapter, json.loads((src / "config.json").read_text()), tmp_path / "lora.gguf")
    for lora, ref in ((None, base_ref), (str(lora_gguf), merged_ref)):
        llm = load_llama(base_gguf, lora_path=lora)
        try:
            got = llama_logits(llm, ids)
        finally:
            llm.close()
        assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max()), (kind, lora)
    assert np.abs(merged_ref - base_ref).max() > 0.05  # the adapter matters, so the second check means something


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CORPUS = [MULTILINGUAL, TEXT, "In 2024, 1,234,567 people paid $99.95 for 3 items on 12/31. Call 555-0123 at 10:30.",
          "def add(a, b):\n    return a + b  # 100% 42 1999 2000 2001\n"]


@pytest.mark.parametrize("split, expected_pre", [(LLAMA3_SPLIT, "llama-bpe"), (GPT2_SPLIT, "gpt-2")])
def test_trained_tokenizers_get_the_right_pre_tokenizer(tmp_path: Path, split: str, expected_pre: str):
    """Tokenizers trained here with Llama 3's and GPT-2's split rules (multi-digit merges, so the digit rules
    differ): the GGUF names the right pre-tokenizer and llama.cpp tokenizes exactly like transformers."""
    from test_export_command import tiny_tokenizer

    tok = tiny_tokenizer(split, vocab_size=1200, corpus=CORPUS * 20)
    assert any(t.isdigit() and len(t) >= 2 for t in tok.get_vocab())  # multi-digit tokens were learned
    src = _tiny_model("llama", tmp_path, tmp_path / "m", vocab_size=len(tok), num_hidden_layers=1)
    tok.save_pretrained(str(src))
    path = convert_to_gguf(src, tmp_path / "m.gguf", "f16").path
    llm = load_llama(path, vocab_only=True)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == expected_pre
        for text in (MULTILINGUAL, CORPUS[2], "<|im_start|>user\n2024 年<|im_end|>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()

