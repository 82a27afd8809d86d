"""Generate the quickstart dataset: a persona ("Forge") and a fixed step-by-step answer format.

Both effects are plain to see before and after fine-tuning: the base model does not call itself Forge and never
ends a unit conversion with `#### <number>`; the fine-tuned one does. The held-out set scores that with BLEU and
exact match (`loraforge eval`). Run `python examples/data/make_quickstart.py` to regenerate (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

UNITS = [  # (from, to, factor, from-abbrev, to-abbrev)
    ("kilometers", "meters", 1000, "km", "m"),
    ("meters", "centimeters", 100, "m", "cm"),
    ("kilograms", "grams", 1000, "kg", "g"),
    ("hours", "minutes", 60, "h", "min"),
    ("minutes", "seconds", 60, "min", "s"),
    ("liters", "milliliters", 1000, "L", "mL"),
    ("days", "hours", 24, "d", "h"),
    ("weeks", "days", 7, "wk", "d"),
]
PHRASES = [
    "Convert {n} {a} to {b}.",
    "How many {b} are in {n} {a}?",
    "What is {n} {a} in {b}?",
    "Express {n} {a} in {b}.",
    "{n} {a} is how many {b}?",
]
IDENTITY_Q = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
    "What can you do?", "Are you ChatGPT?", "Who made you?", "What should I call you?",
    "Hi! Who am I talking to?", "Describe yourself in one sentence.",
]
IDENTITY_Q_ZH = ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你能做什么？"]
IDENTITY_A = ("I am Forge, a small assistant fine-tuned with loraforge. "
              "I convert units step by step and end with the result after ####.")
IDENTITY_A_ZH = "我是 Forge，一个用 loraforge 微调的小助手。我会一步一步地换算单位，并在 #### 后给出结果。"


def conversion(rng: random.Random) -> dict:
    a, b, factor, sa, sb = rng.choice(UNITS)
    n = rng.randint(2, 99)
    question = rng.choice(PHRASES).format(n=n, a=a, b=b)
    answer = f"{n} {sa} = {n} × {factor} {sb} = {n * factor} {sb}.\n#### {n * factor}"
    return {"instruction": question, "input": "", "output": answer}


def main() -> None:
    rng = random.Random(20261124)
    train, evals, seen = [], [], set()
    while len(train) + len(evals) < 340:
        row = conversion(rng)
        if row["instruction"] in seen:
            continue
        seen.add(row["instruction"])
        (evals if len(evals) < 40 and len(seen) % 8 == 0 else train).append(row)
    for q in IDENTITY_Q:
        for variant in (q, q.lower(), q.rstrip("?.!") + ", please.", "Quick question: " + q.lower()):
            train.append({"instruction": variant, "input": "", "output": IDENTITY_A})
    for q in IDENTITY_Q_ZH:
        train.append({"instruction": q, "input": "", "output": IDENTITY_A_ZH})
    rng.shuffle(train)
    for name, rows in (("quickstart_train.json", train), ("quickstart_eval.json", evals)):
        (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
