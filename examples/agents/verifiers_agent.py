#!/usr/bin/env python3
"""Runs a verifiers environment (PyPI `verifiers`) as a Tandem agent program, unchanged:
the environment's own rollout talks to the policy through the generator's
OpenAI-compatible endpoint, and its rubric's reward is the episode's reward.

Tandem starts it once per episode ([env] agent) with the task as JSON on stdin and
OPENAI_BASE_URL / OPENAI_API_KEY (the episode's key) / TANDEM_EPISODE_ID in its
environment. This script loads the environment (`load_environment` of the module
`--env` names, as `vf.load_environment` does), runs one rollout of one of its rows with
a verifiers client pointed at the endpoint (the episode's key as the API key, its id as
the `X-Episode-Id` header), and prints `{"reward": r}` as its last line.

    [env]
    agent = ["python3", "examples/agents/verifiers_agent.py",
             "--env", "vf_arithmetic", "--env-path", "examples/agents"]

Which row: `--rows env` (the default) takes the environment's own dataset row
`prompt_index mod len(dataset)` (its prompt, answer and info: the environment as its
author wrote it; Tandem's `[data]` then only numbers the tasks), `--rows task` builds
the row from Tandem's task (its messages, or its prompt text for a completion
environment, and its answer).

The client is verifiers' own: `openai_chat_completions` (`/v1/chat/completions`), or
`openai_completions` (`/v1/completions`) for an environment whose `message_type` is
"completion"; `--client` picks one. The sampling arguments are what verifiers' trainers
send: `logprobs` and `return_token_ids` (the endpoint answers with the sampled token
ids and their behaviour logprobs; Tandem records them itself), plus `--max-tokens`;
`--sampling-args JSON` adds or replaces fields.

Needs verifiers' classic API (`import verifiers as vf`: `load_environment`,
`Environment.run_rollout` with a `verifiers.types.ClientConfig`): verifiers 0.3.x
(studied with 0.3.1: pip install 'verifiers==0.3.1'). verifiers 0.4 keeps only its new
`verifiers.v1` stack, whose harness programs stream their requests and are installed
with uv per rollout; it is refused here with that reason.
"""

import argparse
import asyncio
import json
import os
import sys


def fail(message):
    print(f"verifiers_agent: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", required=True, help="the environment's module (a name on sys.path)")
    p.add_argument("--env-path", action="append", default=[], help="a folder to import environments from (repeatable)")
    p.add_argument("--env-args", default="{}", help="keyword arguments of its load_environment, as JSON")
    p.add_argument("--rows", choices=["env", "task"], default="env", help="the environment's dataset rows, or Tandem's task")
    p.add_argument("--client", choices=["openai_chat_completions", "openai_completions"], help="verifiers' client type")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per model turn at most")
    p.add_argument("--sampling-args", default="{}", help="sampling arguments added to the defaults, as JSON")
    return p.parse_args()


def json_arg(text, name):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{name}: not JSON: {e}")
    if not isinstance(value, dict):
        fail(f"{name}: must be a JSON object")
    return value


def load_verifiers():
    try:
        import verifiers as vf
    except ImportError as e:
        fail(f"cannot import verifiers ({e}); pip install 'verifiers==0.3.1' into the Python that runs this agent")
    version = getattr(vf, "__version__", "?")
    try:
        load = vf.load_environment
        from verifiers.types import ClientConfig
    except (AttributeError, ImportError):
        fail(
            f"verifiers {version} has no classic API (vf.load_environment, verifiers.types.ClientConfig): "
            "verifiers 0.4 keeps only verifiers.v1; install verifiers<0.4 (tested with 0.3.1)"
        )
    return vf, load, ClientConfig


def row_from_task(task, env, completion):
    """A dataset row built from Tandem's task."""
    if completion:
        prompt = task.get("prompt") or "\n".join(m["content"] for m in task["messages"])
    else:
        prompt = list(task["messages"])
        system = getattr(env, "system_prompt", None)
        if system and not any(m.get("role") == "system" for m in prompt):
            prompt.insert(0, {"role": "system", "content": system})
    return {
        "prompt": prompt,
        "answer": task.get("answer", ""),
        "info": {},
        "example_id": task.get("prompt_index", 0),
    }


def main():
    args = parse_args()
    task = json.loads(sys.stdin.readline())
    for path in reversed(args.env_path):
        sys.path.insert(0, os.path.abspath(path))
    vf, load, ClientConfig = load_verifiers()
    env = load(args.env, **json_arg(args.env_args, "--env-args"))
    completion = getattr(env, "message_type", "chat") == "completion"
    client_type = args.client or ("openai_completions" if completion else "openai_chat_completions")

    if args.rows == "env":
        rows = env.get_dataset()
        if rows is None or len(rows) == 0:
            fail(f"environment {args.env!r} has no dataset rows; run it with --rows task")
        row = dict(rows[int(task.get("prompt_index", 0)) % len(rows)])
    else:
        row = row_from_task(task, env, completion)

    client = ClientConfig(
        client_type=client_type,
        api_base_url=os.environ["OPENAI_BASE_URL"],
        api_key_var="OPENAI_API_KEY",
        # The endpoint serves this episode to its own key alone; a retried request would
        # be a second turn, so verifiers' client does not retry.
        extra_headers={"X-Episode-Id": os.environ["TANDEM_EPISODE_ID"]},
        max_retries=0,
    )
    sampling = {"logprobs": 1 if client_type == "openai_completions" else True, "extra_body": {"return_token_ids": True}}
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens
    extra = json_arg(args.sampling_args, "--sampling-args")
    sampling["extra_body"].update(extra.pop("extra_body", {}) or {})
    sampling.update(extra)

    out = asyncio.run(env.run_rollout(row, client, task.get("model", "tandem"), sampling))
    reward = float(out.get("reward") or 0.0)
    print(json.dumps({"reward": reward}))
    if out.get("error"):
        # The turns it sampled still train; the generator logs why this episode failed.
        print(f"verifiers_agent: the rollout ended with an error: {out['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
