"""Each metric against values worked out by hand (LLaMA-Factory's definitions), English and Chinese."""

from __future__ import annotations

import math

import pytest

from loraforge.evaluate.metrics import (
    compute_metrics, corpus_sacrebleu, exact_match, extract_answer, similarity_scores,
)


def test_bleu4_characters_with_method3_smoothing():
    # "abce" vs "abcd": 1-4 gram precisions 3/4, 2/3, 1/2, 0/1; method3 turns the first zero count into
    # 1/(2*1); same length so no brevity penalty.
    expected = (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert similarity_scores("abce", "abcd")["bleu-4"] == round(expected * 100, 4) == 59.4604


def test_bleu4_brevity_penalty():
    # "abc" vs "abcd": precisions 1, 1, 1 and 0/1 -> 1/2; brevity penalty exp(1 - 4/3).
    expected = 0.5 ** 0.25 * math.exp(1 - 4 / 3)
    assert similarity_scores("abc", "abcd")["bleu-4"] == round(expected * 100, 4)


def test_chinese_bleu_and_rouge_by_hand():
    pred, label = "今天天气不错", "今天天气很好"
    # characters: 1-gram 4/6 (今, 天×2, 气), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3
    bleu = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    # jieba: [今天天气, 不错] vs [今天天气, 很, 好]: 1 shared unigram, no shared bigram, LCS 1
    f = 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)
    scores = similarity_scores(pred, label)
    assert scores == {"bleu-4": round(bleu * 100, 4), "rouge-1": round(f * 100, 4),
                      "rouge-2": 0.0, "rouge-l": round(f * 100, 4)}
    assert scores["bleu-4"] == 50.8133 and scores["rouge-1"] == 40.0


def test_english_rouge_by_hand():
    # rouge-chinese counts distinct n-grams for ROUGE-N and the LCS over all tokens for ROUGE-L.
    scores = similarity_scores("the cat sat", "the cat sat on the mat")
    assert scores["rouge-1"] == round(2 * 1 * 0.6 / 1.6 * 100, 4) == 75.0          # p 3/3, r 3/5 distinct
    assert scores["rouge-2"] == round(2 * 1 * 0.4 / 1.4 * 100, 4) == 57.1429       # p 2/2, r 2/5
    assert scores["rouge-l"] == round(2 * 1 * 0.5 / 1.5 * 100, 4) == 66.6667       # LCS 3: p 3/3, r 3/6


@pytest.mark.parametrize("pred,label", [("", "答案"), ("答案", ""), ("   ", "x"), ("", "")])
def test_empty_strings_score_zero(pred, label):
    assert similarity_scores(pred, label) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_identical_texts_score_100():
    assert similarity_scores("你好，世界", "你好，世界") == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_sacrebleu_corpus():
    assert corpus_sacrebleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # CJK references switch to the zh tokenizer, which splits characters: same n-grams as the hand BLEU above
    # (every precision is non-zero, so no smoothing) and no brevity penalty.
    zh = corpus_sacrebleu(["今天天气不错"], ["今天天气很好"])
    assert zh == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100, abs=1e-6)
    # corpus BLEU pools counts: two sentences with 4 and 0 matching words are not the mean of two scores
    pooled = corpus_sacrebleu(["a b c d", "w x y z"], ["a b c d", "e f g h"])
    assert pooled == pytest.approx((4 / 8 * 3 / 6 * 2 / 4 * 1 / 2) ** 0.25 * 100, abs=1e-6)


@pytest.mark.parametrize("text,answer", [
    ("so x = \\boxed{\\frac{1}{2}} and done", "\\frac{1}{2}"),
    ("first \\boxed{3} then \\boxed{4}.", "4"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1234"),
    ("She has 3 apples, then 5, so 12.0 in total.", "12"),
    ("The answer is -0.5.", "-0.5"),
    ("no digits here", "no digits here"),
    ("$ 1,000,000 $", "1000000"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_match_and_average():
    assert exact_match("We get 6 * 12 = 72 in total.", "Step by step ... #### 72") == 100.0
    assert exact_match("so \\boxed{71}", "#### 72") == 0.0
    metrics = compute_metrics(["abce", "今天天气不错", "The answer is 72"], ["abcd", "今天天气很好", "#### 72"])
    per = [similarity_scores(p, lab) for p, lab in
           [("abce", "abcd"), ("今天天气不错", "今天天气很好"), ("The answer is 72", "#### 72")]]
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert metrics[key] == pytest.approx(sum(s[key] for s in per) / 3)
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert set(metrics) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "sacrebleu", "exact_match"}
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
