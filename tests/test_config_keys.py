"""Every config key does what it says: each declared field is read outside config/ (or turned into a transformers
argument by config/), and each unsupported LLaMA-Factory key is refused unless it holds its neutral value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import loraforge
from loraforge.config import load_config
from loraforge.config.compat import NEUTRAL_KEYS, TRANSLATED_KEYS
from loraforge.config.parser import GROUPS, all_fields
from loraforge.errors import ConfigError

PACKAGE = Path(loraforge.__file__).resolve().parent
MINIMAL = {"model_name_or_path": "tiny-random-qwen3", "dataset": "demo"}


def declared_fields() -> dict[str, str]:
    """Field -> group for every field loraforge declares (the inherited transformers fields are HF's to read)."""
    out = {}
    for group, cls in GROUPS.items():
        own = cls.__dict__.get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.init and f.name in own:
                out.setdefault(f.name, group)
    return out


def names_read_outside_config() -> set[str]:
    """Attribute names read anywhere in the package but config/ (``cfg.data.x``, ``getattr(obj, "x")``)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if "config" in path.relative_to(PACKAGE).parts[:1]:
            continue
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"\.([A-Za-z_]\w*)\b", text))
        names |= set(re.findall(r"getattr\(\s*[\w.]+\s*,\s*[\"'](\w+)[\"']", text))
    return names


def test_every_declared_field_is_used():
    read = names_read_outside_config()
    unused = sorted(f"{name} ({group})" for name, group in declared_fields().items()
                    if name not in read and name not in TRANSLATED_KEYS)
    assert not unused, ("declared but never read outside config/: implement each, or move it to "
                        f"config/compat.py NEUTRAL_KEYS so other values are refused: {', '.join(unused)}")


def test_unsupported_keys_are_not_declared():
    """A key in NEUTRAL_KEYS that is also a field would be accepted silently (the refusal never fires)."""
    assert not set(NEUTRAL_KEYS) & set(all_fields())


def _other_value(neutral: tuple):
    sample = next((v for v in neutral if v is not None), None)
    if isinstance(sample, bool):
        return not sample
    if isinstance(sample, (int, float)):
        return sample * 2 + 1
    return "something-else" if isinstance(sample, str) else 4


@pytest.mark.parametrize("key", sorted(NEUTRAL_KEYS))
def test_unsupported_key_accepts_only_its_neutral_value(key):
    neutral, feature = NEUTRAL_KEYS[key]
    for value in neutral:
        load_config({**MINIMAL, key: value}, build_training_args=False)
    other = _other_value(neutral)
    with pytest.raises(ConfigError) as err:
        load_config({**MINIMAL, key: other}, build_training_args=False)
    assert f"`{key}: {other!r}` (in the config) asks for {feature}, which loraforge does not support yet; " \
           f"remove the key or set it to {neutral[0]!r}" in str(err.value)


def test_translated_keys_set_their_transformers_argument():
    plain = load_config(MINIMAL).training
    cfg = load_config({**MINIMAL, "warmup_ratio": 0.1, "disable_shuffling": True})
    assert set(TRANSLATED_KEYS) == {"warmup_ratio", "disable_shuffling"}
    assert (plain.warmup_steps, cfg.training.warmup_steps) == (0, 0.1)
    assert (plain.train_sampling_strategy, cfg.training.train_sampling_strategy) == ("random", "sequential")
    with pytest.raises(ConfigError, match="disable_shuffling: true` and `train_sampling_strategy: group_by_length"):
        load_config({**MINIMAL, "disable_shuffling": True, "train_sampling_strategy": "group_by_length"})


def test_max_length_needs_max_new_tokens_off():
    cfg = load_config({**MINIMAL, "max_length": 300}, purpose="chat", build_training_args=False)
    assert any("`max_length` is not used because `max_new_tokens: 1024`" in n for n in cfg.notes)
    load_config({**MINIMAL, "max_length": 300, "max_new_tokens": 0}, purpose="chat")
    with pytest.raises(ConfigError, match="set a positive max_new_tokens"):
        load_config({**MINIMAL, "max_new_tokens": 0, "max_length": 0}, purpose="chat")


def test_config_imports_nothing_above_it():
    """config/ is the bottom layer: it may use loraforge.errors, never data/, models/, train/ ..."""
    for path in sorted((PACKAGE / "config").glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            found = re.match(r"\s*(?:from \.\.(\w+)|(?:from|import) loraforge\.(\w+))", line)
            if found:
                assert (found.group(1) or found.group(2)) == "errors", f"config/{path.name}: {line.strip()}"


def test_known_template_names_are_passed_in():
    raw = {**MINIMAL, "template": "qwen4"}
    load_config(raw, build_training_args=False)  # without the names, data/ reports it when resolving
    with pytest.raises(ConfigError, match=r"unknown `template: qwen4`; did you mean qwen, qwen3\?"):
        load_config(raw, build_training_args=False, template_names=["qwen", "qwen3", "llama3"])


def test_a_command_that_fails_to_import_is_an_error(monkeypatch):
    from loraforge import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "loraforge.no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="loraforge.no_such_command"):
        cli.build_parser()


def test_eval_on_each_dataset_needs_named_eval_sets():
    with pytest.raises(ConfigError, match="`eval_on_each_dataset: true` needs `eval_dataset`"):
        load_config({**MINIMAL, "eval_on_each_dataset": True, "val_size": 0.1}, build_training_args=False)
    raw = {**MINIMAL, "eval_on_each_dataset": True, "eval_dataset": "a,b", "eval_strategy": "steps",
           "load_best_model_at_end": True}
    with pytest.raises(ConfigError, match="needs `metric_for_best_model: eval_<name>_loss`"):
        load_config(raw, build_training_args=False)
    load_config({**raw, "metric_for_best_model": "eval_a_loss"}, build_training_args=False)
