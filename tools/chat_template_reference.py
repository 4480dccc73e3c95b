#!/usr/bin/env python3
"""Renders chat templates with transformers' `apply_chat_template` (Python's Jinja2) for
the conversations Tandem must render identically with minijinja, and writes the strings
to tests/fixtures/qwen3-chat-template.json; model/tests/chat_template.rs renders the
same cases and compares them exactly.

The template is Qwen3's (model/src/templates/qwen3.jinja, from Qwen3-0.6B's
tokenizer_config.json, Apache-2.0), set on a tokenizer with Qwen3's special tokens
(`eos_token` <|im_end|>, `pad_token` <|endoftext|>, no `bos_token`). The cases cover
`enable_thinking` unset, false and true; a system turn; multi-turn conversations
whose assistant history carries <think>…</think> (dropped before the last user turn,
kept after it); a conversation that ends with the assistant's turn; tool turns;
`tools` given as a template variable (rendered through `tojson`). A second, small
template prints template variables of every TOML type, so the way a value reaches a
template is compared too.

  /work/refvenv/bin/python tools/chat_template_reference.py [--out tests/fixtures/qwen3-chat-template.json]
"""
import argparse
import json
import os

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Prints variables of each type a config can give: `{{ x }}` and `tojson` of each.
VARIABLES_TEMPLATE = (
    "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "flag={{ flag }} n={{ n }} x={{ x }} s={{ s }} xs={{ xs }}\n"
    "{{ flag | tojson }} {{ n | tojson }} {{ x | tojson }} {{ s | tojson }} {{ xs | tojson }}\n"
    "{{ t | tojson }}\n{{ t | tojson(indent=2) }}\n"
    "{%- for k, v in t.items() %} {{ k }}={{ v }}{% endfor %}\n"
    "{{ eos_token }}|{{ bos_token }}|{{ tools is none }}"
    "{%- if add_generation_prompt %}\nassistant:{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city — \"now\" <today>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


def cases():
    """(name, template, messages, add_generation_prompt, kwargs)."""
    think = "<think>\nFirst add the units.\n</think>\n\n4"
    return [
        ("user", "qwen3", [user("What is 2 + 2?")], True, {}),
        ("user_no_thinking", "qwen3", [user("What is 2 + 2?")], True, {"enable_thinking": False}),
        ("user_thinking", "qwen3", [user("What is 2 + 2?")], True, {"enable_thinking": True}),
        ("system", "qwen3",
         [{"role": "system", "content": "You are terse."}, user("Hi")], True, {}),
        ("history_with_thinking", "qwen3",
         [user("What is 2 + 2?"), assistant(think), user("And 3 + 3?")], True,
         {"enable_thinking": False}),
        ("ends_with_assistant", "qwen3",
         [{"role": "system", "content": "You are terse."}, user("What is 2 + 2?"),
          assistant(think)], False, {}),
        ("ends_with_plain_assistant", "qwen3",
         [user("What is 2 + 2?"), assistant("4")], False, {}),
        ("multi_turn", "qwen3",
         [user("a"), assistant("<think>x</think>b"), user("c"), assistant("d"), user("e")],
         True, {"enable_thinking": True}),
        ("tool_turns", "qwen3",
         [user("Weather in Oslo?"),
          assistant("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"),
          {"role": "tool", "content": "rain"}, {"role": "tool", "content": "5 C"}],
         True, {}),
        ("tools_variable", "qwen3",
         [{"role": "system", "content": "Use tools."}, user("Weather in Oslo?")], True,
         {"tools": [WEATHER_TOOL], "enable_thinking": False}),
        ("variables", "variables", [user("q"), assistant("a")], True,
         {"flag": False, "n": 3, "x": 0.25, "s": "é\"<b>", "xs": [1, "two", True, "it's"],
          "t": {"z": 1, "a": [1.5, {"k": "v"}], "m": "x"}}),
    ]


def tokenizer(template):
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "qwen3-chat-template.json"))
    args = ap.parse_args()
    with open(os.path.join(ROOT, "model", "src", "templates", "qwen3.jinja")) as f:
        templates = {"qwen3": f.read(), "variables": VARIABLES_TEMPLATE}
    out = []
    for name, which, messages, gen, kwargs in cases():
        text = tokenizer(templates[which]).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, **kwargs)
        out.append({"name": name, "template": which, "messages": messages,
                    "add_generation_prompt": gen, "kwargs": kwargs, "text": text})
    doc = {"generated_by": "tools/chat_template_reference.py",
           "transformers": transformers.__version__,
           "variables_template": VARIABLES_TEMPLATE, "cases": out}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(out)} cases to {args.out}")


if __name__ == "__main__":
    main()
