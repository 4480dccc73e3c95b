"""A small verifiers environment (classic API, `import verifiers as vf`): single-turn
arithmetic questions whose dataset is written here (no download), scored by a rubric:
1 for the right number, 0.2 for a reply that is a bare number at all.

    vf.load_environment("vf_arithmetic")   # with this folder on sys.path

Run as a Tandem agent by examples/agents/verifiers_agent.py (examples/tiny-verifiers.toml).
"""

import re

import verifiers as vf
from datasets import Dataset

QUESTIONS = [(a, op, b) for a, b in [(12, 7), (3, 9), (25, 4), (8, 8), (41, 16), (6, 7), (90, 11), (14, 3)] for op in "+-*"]


def rows():
    for a, op, b in QUESTIONS:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        yield {"question": f"What is {a} {op} {b}?", "answer": str(value)}


def reply_text(completion):
    if isinstance(completion, str):
        return completion
    last = completion[-1] if completion else {}
    content = last.get("content") if isinstance(last, dict) else getattr(last, "content", "")
    return content or ""


def correct_answer(completion, answer, **kwargs):
    numbers = re.findall(r"-?\d+", reply_text(completion))
    return 1.0 if numbers and numbers[-1] == answer else 0.0


def bare_number(completion, **kwargs):
    return 1.0 if re.fullmatch(r"\s*-?\d+\s*", reply_text(completion)) else 0.0


def load_environment(**kwargs):
    return vf.SingleTurnEnv(
        dataset=Dataset.from_list(list(rows())),
        system_prompt="Answer with the number only.",
        rubric=vf.Rubric(funcs=[correct_answer, bare_number], weights=[1.0, 0.2]),
        **kwargs,
    )
