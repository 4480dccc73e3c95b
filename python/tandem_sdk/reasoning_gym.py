"""reasoning-gym's tasks in Tandem: a task's entries as a JSONL dataset, and the task's
own scorer as a `tandem.v1.Reward` service.

    pip install './python[reasoning-gym]'
    python -m tandem_sdk.reasoning_gym export --task chain_sum --size 2000 --seed 1 \\
        --config min_terms=2 --config max_terms=2 --config max_digits=1 train.jsonl
    TANDEM_REWARD_TOKEN=… python -m tandem_sdk.reasoning_gym serve --task chain_sum \\
        --config min_terms=2 --config max_terms=2 --config max_digits=1 --port 50061

`export` writes one record per entry: `prompt` (the entry's question, then the
instruction on how to answer), `answer` (the entry's answer) and `info` (the entry's
`metadata`, made JSON: tuples and sets become lists, other objects their text).
`--exclude FILE.jsonl` leaves out the prompts of another export (a training file that
excludes its held-out set), `--unique` any prompt already written.
`serve` scores each completion with the task's own `score_answer(answer, entry)`,
the entry rebuilt as reasoning-gym's scorers read it: `{"question": prompt, "answer":
answer, "metadata": info}` (scorers read `entry["answer"]` and `entry["metadata"]`).
`info` comes with each request: Tandem sends the record's `info` (`info_json`).

The answer is extracted from the completion as reasoning-gym expects it, bare:
`--extract tags` takes the text inside the last `<answer>…</answer>` (reasoning-gym's
own `extract_answer`; none: no answer, score 0); `--extract lenient` (the default)
takes that, else the text after the last "Answer:", else the whole completion,
stripped, so that a model not yet in the format still earns the partial credit many
scorers give a reply that contains the answer (1 for the bare answer). The export's
instruction asks for the tags.
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import fractions
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import _cli, _server
from .reward import TOKEN_ENV, serve_reward

#: What the exported prompts end with (`--instruction` replaces it).
INSTRUCTION = "Give only the final answer, between <answer> and </answer>."

EXTRACT_MODES = ("lenient", "tags")


def _rg() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise _server.SdkError(
            f"reasoning-gym is not installed ({e}): pip install './python[reasoning-gym]' "
            "(or pip install reasoning-gym)"
        ) from e
    return reasoning_gym


def parse_config(items: Iterable[str]) -> Dict[str, Any]:
    """`key=value` pairs as the task's config: a value that is JSON (3, 0.5, true,
    ["+", "-"]) is that value, anything else is a string."""
    config: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _server.SdkError(f"--config {item!r}: expected KEY=VALUE")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def dataset(task: str, config: Dict[str, Any], size: int = 1, seed: int = 0) -> Any:
    """reasoning-gym's dataset `task` with `config`, or an error listing the tasks."""
    rg = _rg()
    names = sorted(getattr(rg.factory, "DATASETS", {}))
    if names and task not in names:
        raise _server.SdkError(f"--task {task!r}: not a reasoning-gym task; one of {', '.join(names)}")
    try:
        return rg.create_dataset(task, size=size, seed=seed, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise _server.SdkError(f"--task {task} with config {config}: {e}") from e


def jsonable(x: Any) -> Any:
    """`x` as JSON values: dicts (keys as text), lists (from tuples, sets sorted when
    they can be), numbers (numpy's too; a non-finite float as its text), text."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        items = [jsonable(v) for v in x]
        try:
            return sorted(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, (fractions.Fraction, decimal.Decimal)):
        return str(x)
    item = getattr(x, "item", None)  # numpy scalars
    if callable(item) and getattr(x, "shape", None) == ():
        return jsonable(item())
    tolist = getattr(x, "tolist", None)  # numpy arrays
    if callable(tolist):
        return jsonable(tolist())
    return str(x)


def record(entry: Dict[str, Any], instruction: str = INSTRUCTION) -> Dict[str, Any]:
    """One dataset record of a reasoning-gym entry: prompt, answer, info."""
    question = str(entry["question"]).rstrip()
    out: Dict[str, Any] = {"prompt": f"{question}\n\n{instruction}" if instruction else question}
    answer = entry.get("answer")
    if answer is not None:
        out["answer"] = answer if isinstance(answer, str) else json.dumps(jsonable(answer))
    out["info"] = jsonable(entry.get("metadata") or {})
    return out


#: With `exclude` or `unique`, entries are drawn from a dataset this many times `size`.
DRAW_FACTOR = 20


def export(
    task: str,
    size: int,
    seed: int,
    out: str,
    config: Optional[Dict[str, Any]] = None,
    instruction: str = INSTRUCTION,
    exclude: Iterable[str] = (),
    unique: bool = False,
) -> int:
    """Writes `size` records of `task` (seed `seed`) to `out` (JSONL; `-`: stdout),
    whole or not at all; returns how many. `exclude`: JSONL files whose prompts are
    left out (a held-out set: the training file excludes the evaluation's); `unique`:
    no prompt twice. Either draws the entries in order from a dataset of
    `DRAW_FACTOR` × `size` entries, and fails when too few are left."""
    if size < 1:
        raise _server.SdkError(f"--size must be ≥ 1, got {size}")
    excluded = set(load_prompts(exclude))
    filtered = bool(excluded) or unique
    pool = size * DRAW_FACTOR if filtered else size
    ds = dataset(task, dict(config or {}), size=pool, seed=seed)
    lines: List[str] = []
    seen: set = set()
    for i in range(pool):
        r = record(ds[i], instruction)
        if r["prompt"] in excluded or (unique and r["prompt"] in seen):
            continue
        seen.add(r["prompt"])
        lines.append(json.dumps(r, ensure_ascii=False, allow_nan=False))
        if len(lines) == size:
            break
    if len(lines) < size:
        raise _server.SdkError(
            f"only {len(lines)} of {pool} entries of {task} are left after --exclude / --unique; "
            f"ask for fewer than {size}, or widen the task's config"
        )
    text = "".join(line + "\n" for line in lines)
    if out == "-":
        sys.stdout.write(text)
        return size
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return size


_ANSWER_COLON = re.compile(r"answer\s*:", re.IGNORECASE)


def extract(completion: str, mode: str = "lenient") -> Optional[str]:
    """The answer in `completion` (see the module's doc): `tags` reads the last
    `<answer>…</answer>` only; `lenient` falls back to the text after the last
    "Answer:", then the whole completion. None when there is none."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(completion)
    if tagged is not None or mode == "tags":
        return tagged
    if mode != "lenient":
        raise ValueError(f"extract mode {mode!r}: one of {', '.join(EXTRACT_MODES)}")
    marks = list(_ANSWER_COLON.finditer(completion))
    text = completion[marks[-1].end():] if marks else completion
    text = text.strip()
    return text or None


def load_prompts(paths: Iterable[str]) -> List[str]:
    """The `prompt` of every record of the JSONL files."""
    prompts: List[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            prompts.append(json.loads(line)["prompt"])
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise _server.SdkError(f"{path}:{n}: not a record with a prompt: {e}") from e
        except OSError as e:
            raise _server.SdkError(f"--exclude {path}: {e}") from e
    return prompts


def scorer(
    task: str,
    config: Optional[Dict[str, Any]] = None,
    extract_mode: str = "lenient",
) -> Callable[[str, str, str, Dict[str, Any]], float]:
    """The reward function of `task`: the completion's extracted answer scored by the
    task's `score_answer` against the entry rebuilt from prompt, answer and info."""
    if extract_mode not in EXTRACT_MODES:
        raise _server.SdkError(f"--extract {extract_mode!r}: one of {', '.join(EXTRACT_MODES)}")
    ds = dataset(task, dict(config or {}))

    def score(prompt: str, completion: str, answer: str, info: Dict[str, Any]) -> float:
        entry = {"question": prompt, "answer": answer, "metadata": info}
        try:
            value = ds.score_answer(extract(completion, extract_mode), entry)
        except (KeyError, TypeError) as e:
            if not info:
                raise ValueError(
                    f"{task}'s score_answer needs the record's info (its metadata), and this request "
                    "carries none: train on records written by `export` (their `info`), with "
                    f"`[data] kind` jsonl or parquet ({type(e).__name__}: {e})"
                ) from e
            raise
        return float(value)

    score.__qualname__ = f"reasoning_gym[{task}].score_answer"
    return score


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tandem_sdk.reasoning_gym",
        description="reasoning-gym's tasks as Tandem datasets and reward services",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a task's entries as JSONL records (prompt, answer, info)")
    ex.add_argument("--task", required=True, help="a reasoning-gym task (`list` names them)")
    ex.add_argument("--size", type=int, default=100, help="records (default %(default)s)")
    ex.add_argument("--seed", type=int, default=0, help="the task's seed (default %(default)s)")
    ex.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="a task config field (repeatable)")
    ex.add_argument("--instruction", default=INSTRUCTION, help="what each prompt ends with (default: %(default)r; '' for none)")
    ex.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="leave out the prompts of these records (the held-out set; repeatable)",
    )
    ex.add_argument("--unique", action="store_true", help="no prompt twice")
    ex.add_argument("out", metavar="OUT.jsonl", help="where to write (- for stdout)")
    sv = sub.add_parser("serve", help="serve a task's scorer as a tandem.v1.Reward service")
    sv.add_argument("--task", required=True)
    sv.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    sv.add_argument(
        "--extract",
        choices=EXTRACT_MODES,
        default="lenient",
        help="how the answer is read from a completion (default %(default)s; see the module's doc)",
    )
    _cli.add_service_options(sv, TOKEN_ENV)
    sub.add_parser("list", help="the tasks reasoning-gym has")

    def go() -> None:
        args = ap.parse_args(argv)
        if args.command == "list":
            print("\n".join(sorted(_rg().factory.DATASETS)))
        elif args.command == "export":
            n = export(
                args.task,
                args.size,
                args.seed,
                args.out,
                parse_config(args.config),
                args.instruction,
                exclude=args.exclude,
                unique=args.unique,
            )
            if args.out != "-":
                print(f"wrote {n} records of {args.task} (seed {args.seed}) to {args.out}", file=sys.stderr)
        else:
            options = _cli.service_options(args)
            fn = scorer(args.task, parse_config(args.config), args.extract)
            serve_reward(fn, **options)

    _cli.run(go)


if __name__ == "__main__":
    main()
