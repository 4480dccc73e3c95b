"""`python -m tandem_sdk.reasoning_gym`: export writes records Tandem reads (prompt,
answer, info as JSON), and serve scores completions with the task's own score_answer
over the SDK's Reward service, the entry rebuilt from the request (its info_json). Needs reasoning-gym (the SDK's extra)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest
from fractions import Fraction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import PYTHON, TOKEN, child_env, reward_stub, score  # noqa: E402
from tandem_sdk import reward_server  # noqa: E402
from tandem_sdk import reasoning_gym as trg  # noqa: E402

import reasoning_gym  # noqa: E402,F401  (fails loudly when the extra is missing)

CHAIN = ["min_terms=2", "max_terms=3", "max_digits=1"]


def read(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Export(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def export(self, *args: str) -> list:
        out = os.path.join(self.dir.name, f"out-{len(os.listdir(self.dir.name))}.jsonl")
        subprocess.run(
            [PYTHON, "-m", "tandem_sdk.reasoning_gym", "export", *args, out],
            env=child_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        return read(out)

    def test_records_have_prompt_answer_and_info(self) -> None:
        cfg = [a for c in CHAIN for a in ("--config", c)]
        records = self.export("--task", "chain_sum", "--size", "20", "--seed", "3", *cfg)
        self.assertEqual(len(records), 20)
        for r in records:
            self.assertEqual(set(r), {"prompt", "answer", "info"})
            self.assertTrue(r["prompt"].endswith(trg.INSTRUCTION), r["prompt"])
            self.assertIsInstance(r["answer"], str)
            self.assertEqual(r["info"]["source_dataset"], "chain_sum")
            terms = r["info"]["expression"].split()
            self.assertIn(len(terms), (3, 5))
            self.assertEqual(str(eval(r["info"]["expression"])), r["answer"])
        # A seed is a dataset: the same again, another one differs.
        self.assertEqual(records, self.export("--task", "chain_sum", "--size", "20", "--seed", "3", *cfg))
        other = self.export("--task", "chain_sum", "--size", "20", "--seed", "4", *cfg)
        self.assertNotEqual([r["prompt"] for r in records], [r["prompt"] for r in other])

    def test_a_held_out_set_and_its_training_set_share_no_prompt(self) -> None:
        cfg = [a for c in ("min_terms=2", "max_terms=2", "max_digits=1") for a in ("--config", c)]
        held_out = self.export("--task", "chain_sum", "--size", "50", "--seed", "2", "--unique", *cfg)
        prompts = [r["prompt"] for r in held_out]
        self.assertEqual(len(set(prompts)), 50)
        path = os.path.join(self.dir.name, "held-out.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in held_out)
        train = self.export("--task", "chain_sum", "--size", "300", "--seed", "1", "--exclude", path, *cfg)
        self.assertEqual(len(train), 300)
        self.assertFalse(set(prompts) & {r["prompt"] for r in train})
        # 200 problems in all: 151 distinct ones cannot be found.
        with self.assertRaisesRegex(trg._server.SdkError, "are left"):
            trg.export("chain_sum", 151, 1, os.path.join(self.dir.name, "x.jsonl"), trg.parse_config(CHAIN[:0] + ["min_terms=2", "max_terms=2", "max_digits=1"]), exclude=[path], unique=True)

    def test_metadata_becomes_json(self) -> None:
        self.assertEqual(
            trg.jsonable({"t": (1, 2), "s": {3, 1}, 4: Fraction(1, 3), "f": float("nan"), "n": [None, True]}),
            {"t": [1, 2], "s": [1, 3], "4": "1/3", "f": "nan", "n": [None, True]},
        )
        import numpy as np

        self.assertEqual(trg.jsonable({"a": np.int64(3), "b": np.array([[1, 2]]), "c": np.float32(0.5)}), {"a": 3, "b": [[1, 2]], "c": 0.5})

    def test_config_values(self) -> None:
        self.assertEqual(
            trg.parse_config(["a=3", "b=0.5", "c=true", 'd=["+", "-"]', "e=text"]),
            {"a": 3, "b": 0.5, "c": True, "d": ["+", "-"], "e": "text"},
        )
        with self.assertRaises(trg._server.SdkError):
            trg.parse_config(["nokey"])

    def test_an_unknown_task_or_config_is_one_line(self) -> None:
        for args, says in ((["--task", "no_such_task"], "not a reasoning-gym task"), (["--task", "chain_sum", "--config", "bogus=1"], "bogus")):
            p = subprocess.run(
                [PYTHON, "-m", "tandem_sdk.reasoning_gym", "export", *args, "-"],
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(says, p.stderr)
            self.assertNotIn("Traceback", p.stderr)


class Extract(unittest.TestCase):
    def test_modes(self) -> None:
        cases = [
            ("<answer>12</answer>", "12", "12"),
            ("think <answer>1</answer> then <answer> 13 </answer>", "13", "13"),
            ("The sum is 7. Answer: 7", None, "7"),
            ("  7\n", None, "7"),
            ("", None, None),
        ]
        for text, tags, lenient in cases:
            self.assertEqual(trg.extract(text, "tags"), tags, text)
            self.assertEqual(trg.extract(text, "lenient"), lenient, text)


class Serve(unittest.TestCase):
    def test_the_tasks_own_scorer(self) -> None:
        f = trg.scorer("chain_sum", trg.parse_config(CHAIN))
        with reward_server(f, token=TOKEN) as s:
            got = score(
                reward_stub(s.address),
                ["<answer>-4</answer>", "<answer>4</answer>", "-4", "I think it is -4.", "<answer>-004.0</answer>"],
                prompt="State the final answer to the following arithmetic problem: 4 - 1 - 7 =",
                answer="-4",
            )
        self.assertEqual(got[:3], [1.0, 0.0, 1.0])
        self.assertAlmostEqual(got[3], 2 / len("I think it is -4."))  # reasoning-gym's partial credit
        self.assertEqual(got[4], 1.0)

    def test_a_scorer_that_reads_the_metadata(self) -> None:
        out = os.path.join(tempfile.mkdtemp(), "nf.jsonl")
        trg.export("number_format", 3, 1, out)
        records = read(out)
        r = records[0]
        right = f"<answer>{r['answer']}</answer>"
        with reward_server(trg.scorer("number_format"), token=TOKEN) as s:
            import grpc

            stub = reward_stub(s.address)
            # The record's info on the request, as Tandem sends it: the task's scorer reads it.
            got = score(stub, [right, "<answer>1</answer>"], prompt=r["prompt"], answer=r["answer"], info_json=json.dumps(r["info"]))
            self.assertEqual(got, [1.0, 0.0])
            # Without it: an error that says what is missing.
            with self.assertRaises(grpc.RpcError) as e:
                score(stub, [right], prompt=r["prompt"], answer=r["answer"])
            self.assertEqual(e.exception.code(), grpc.StatusCode.INTERNAL)
            self.assertIn("needs the record's info", e.exception.details())

    def test_the_command(self) -> None:
        p = subprocess.Popen(
            [PYTHON, "-m", "tandem_sdk.reasoning_gym", "serve", "--task", "chain_sum", "--port", "0", *[a for c in CHAIN for a in ("--config", c)]],
            env=child_env(TANDEM_REWARD_TOKEN=TOKEN),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = p.stdout.readline()
            self.assertTrue(line.startswith("listening on 127.0.0.1:"), line + p.stderr.read() if not line else line)
            got = score(reward_stub(line.split()[-1]), ["<answer>6</answer>", "<answer>5</answer>"], prompt="1 + 5 =", answer="6")
            self.assertEqual(got, [1.0, 0.0])
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(timeout=20), 0)
        finally:
            if p.poll() is None:
                p.kill()
            p.stdout.close()
            p.stderr.close()


if __name__ == "__main__":
    unittest.main()
