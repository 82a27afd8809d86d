"""Generate the small demo datasets the seed example configs train on (deterministic).

- sharegpt_demo.json: multi-turn ShareGPT conversations (`conversations: [{from, value}]`), English and Chinese;
- reasoning_demo.json: question / chain-of-thought / answer rows for the plain-text prompt template example.
Replace them with your own data: register a file with `loraforge data register NAME FILE --formatting ...`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

FACTS = [
    ("What does LoRA stand for?", "LoRA stands for Low-Rank Adaptation: small trainable matrices are added to frozen "
     "weights, so fine-tuning updates only a tiny fraction of the parameters."),
    ("What is QLoRA?", "QLoRA trains LoRA adapters on top of a base model whose weights are stored in 4 bits, "
     "which cuts the memory needed for the base model by about four times."),
    ("Why use gradient checkpointing?", "It saves memory by recomputing activations during the backward pass "
     "instead of storing them, at the cost of roughly a third more compute."),
    ("What is a chat template?", "A chat template turns a list of messages into the exact text format a model was "
     "trained on, including its special tokens."),
    ("什么是微调？", "微调是在预训练模型的基础上，用特定任务的数据继续训练，使模型适应新的领域或技能。"),
    ("LoRA 的秩是什么意思？", "秩 r 决定低秩矩阵的大小：r 越大，可训练参数越多，表达能力越强，但显存占用也越多。"),
    ("为什么要划分验证集？", "验证集用来检查模型在没见过的数据上的表现，帮助发现过拟合。"),
    ("What is the learning rate?", "The learning rate sets how large each optimizer update is; LoRA usually uses "
     "1e-4 to 2e-4, full fine-tuning much less."),
]
FOLLOW_UPS = [
    ("Can you say that more briefly?", "In short: {short}"),
    ("请简单总结一下。", "总结：{short}"),
]


def sharegpt_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = FACTS[i % len(FACTS)]
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if rng.random() < 0.5:
            fq, fa = rng.choice(FOLLOW_UPS)
            conv += [{"from": "human", "value": fq}, {"from": "gpt", "value": fa.format(short=a.split(",")[0].split("，")[0])}]
        row = {"conversations": conv}
        if rng.random() < 0.3:
            row["system"] = "You are a concise assistant for machine-learning engineers."
        rows.append(row)
    return rows


def reasoning_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = f"A box holds {a} apples and another holds {b}. How many apples are there in total?"
        cot = f"The first box has {a} apples. The second has {b}. Adding them: {a} + {b} = {a + b}."
        rows.append({"Question": q, "Complex_CoT": cot, "Response": f"There are {a + b} apples in total."})
    return rows


def main() -> None:
    rng = random.Random(7)
    for name, rows in (("sharegpt_demo.json", sharegpt_rows(rng, 64)), ("reasoning_demo.json", reasoning_rows(rng, 64))):
        (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
