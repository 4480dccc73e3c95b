#!/usr/bin/env python3
"""An agent program Tandem trains without knowing its code: it solves an arithmetic
task with a calculator tool it runs itself, talking to the policy through the
generator's OpenAI-compatible endpoint.

Tandem starts it once per episode ([env] agent) with the task as JSON on stdin and
OPENAI_BASE_URL / OPENAI_API_KEY (the episode's key) / TANDEM_EPISODE_ID in its
environment. Every request sends the whole
conversation so far, so the generator merges the turns into one sample (the model's
tokens exactly as sampled). The last line printed is the episode's reward.

    [env]
    agent = ["python3", "examples/agents/calculator_agent.py"]
    max_turns = 3

Needs httpx (pip install httpx). Any OpenAI client works the same way.
"""

import argparse
import ast
import json
import operator
import os
import sys

import httpx

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression (+ - * / and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}

OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def calculate(expression):
    """Arithmetic only: numbers, + - * / and parentheses; no names, no calls."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / ( )")

    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else str(value)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply at most")
    args = parser.parse_args()
    task = json.loads(sys.stdin.readline())
    max_turns = int(task.get("max_turns", 3))
    client = httpx.Client(base_url=os.environ["OPENAI_BASE_URL"], timeout=600)
    messages = list(task["messages"])
    reply = {}
    for turn in range(max_turns):
        r = client.post(
            "/chat/completions",
            headers={
                "X-Episode-Id": os.environ["TANDEM_EPISODE_ID"],
                # The episode's own key: the endpoint serves an episode to it alone.
                "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
            },
            json={
                "model": task["model"],
                "messages": messages,
                "tools": [CALCULATOR],
                "max_tokens": args.max_tokens,
            },
        )
        if r.status_code != 200:
            sys.exit(f"the endpoint answered {r.status_code}: {r.text}")
        reply = r.json()["choices"][0]["message"]
        messages.append(reply)
        calls = reply.get("tool_calls") or []
        if calls:
            for call in calls:
                args = json.loads(call["function"]["arguments"])
                result = calculate(str(args.get("expression", "")))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        elif turn + 1 < max_turns and not (reply.get("content") or "").strip().isdigit():
            # Not a bare number yet: ask once more (a turn that extends the episode).
            messages.append({"role": "user", "content": "Answer with the number only."})
        else:
            break
    answer = (reply.get("content") or "").strip()
    print(json.dumps({"reward": 1.0 if answer == str(task["answer"]).strip() else 0.0}))


if __name__ == "__main__":
    main()
