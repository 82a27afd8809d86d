"""Pure metric functions for predictions against labels.

The similarity scores follow LLaMA-Factory's ``ComputeSimilarity`` so that numbers are comparable with its users'
reports: per sample, BLEU-4 is nltk's ``sentence_bleu`` over *characters* with ``SmoothingFunction().method3``
and ROUGE-1/2/L are rouge-chinese F-scores over jieba tokens joined by spaces (0 when either side has no
tokens); each is multiplied by 100, rounded to 4 decimals and averaged over samples. On top of that:
``sacrebleu`` is the standard corpus BLEU (sacreBLEU, ``13a`` tokenization, ``zh`` when the references hold
CJK characters) and ``exact_match`` compares extracted final answers (``\\boxed{...}``, ``#### n``, last number).
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Sequence

from ..errors import LoraforgeError

SIMILARITY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@lru_cache(maxsize=1)
def _libs():
    """Import the metric libraries once (jieba builds its dictionary on first use)."""
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as err:
        raise LoraforgeError(
            f"the metrics need {err.name}, which is not installed",
            hint="pip install 'loraforge[eval]' (nltk, jieba, rouge-chinese, sacrebleu)") from None
    jieba.setLogLevel(logging.CRITICAL)
    return jieba, sentence_bleu, SmoothingFunction().method3, Rouge()


def similarity_scores(predict: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's per-sample scores (×100, rounded to 4 decimals): bleu-4, rouge-1, rouge-2, rouge-l."""
    jieba, sentence_bleu, method3, rouge = _libs()
    hypothesis = " ".join(jieba.cut(predict))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        rouge_f = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = rouge.get_scores(hypothesis, reference)[0]
        rouge_f = {k: v["f"] for k, v in scores.items()}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=method3) if predict and label else 0.0
    out = {"bleu-4": round(float(bleu) * 100, 4)}
    out.update({k: round(float(rouge_f[k]) * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")})
    return out


def corpus_sacrebleu(predicts: Sequence[str], labels: Sequence[str], tokenize: str | None = None) -> float:
    """Standard corpus BLEU (0-100) from sacreBLEU; ``tokenize`` defaults to ``zh`` for CJK references, else 13a."""
    try:
        import sacrebleu
    except ImportError:
        raise LoraforgeError("sacrebleu is not installed", hint="pip install 'loraforge[eval]'") from None
    if not predicts:
        return 0.0
    if tokenize is None:
        tokenize = "zh" if any(_CJK.search(text) for text in labels) else "13a"
    return float(sacrebleu.corpus_bleu(list(predicts), [list(labels)], tokenize=tokenize).score)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the answer was cut off


def extract_answer(text: str) -> str:
    """The final answer of a math-style response: the last ``\\boxed{...}``, else what follows the last
    ``####`` (GSM8K), else the last number, else the whole text; normalised for comparison."""
    boxed = _last_boxed(text)
    if boxed is not None:
        answer = boxed
    elif "####" in text:
        answer = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    else:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else text
    return normalize_answer(answer)


def normalize_answer(answer: str) -> str:
    """Strip spaces, ``$``, thousands separators and a final period; write numbers canonically (3.0 -> 3)."""
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)
    answer = answer.rstrip(".").strip()
    candidate = answer.replace(",", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", candidate):
        value = float(candidate)
        return str(int(value)) if value.is_integer() else repr(value)
    return " ".join(answer.split())


def exact_match(predict: str, label: str) -> float:
    """100.0 when the extracted answers of ``predict`` and ``label`` are equal, else 0.0."""
    return 100.0 if extract_answer(predict) == extract_answer(label) else 0.0


def compute_metrics(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """All text metrics over a prediction set, unprefixed: bleu-4, rouge-1/2/l, sacrebleu, exact_match."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions but {len(labels)} labels")
    if not predicts:
        return {}
    sums = dict.fromkeys(SIMILARITY_KEYS, 0.0)
    em = 0.0
    for predict, label in zip(predicts, labels):
        for key, value in similarity_scores(predict, label).items():
            sums[key] += value
        em += exact_match(predict, label)
    n = len(predicts)
    out = {key: sums[key] / n for key in SIMILARITY_KEYS}
    out["sacrebleu"] = corpus_sacrebleu(predicts, labels)
    out["exact_match"] = em / n
    return out
