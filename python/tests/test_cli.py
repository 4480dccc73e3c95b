"""The command lines: `python -m tandem_sdk.serve_reward FILE:FUNCTION` and
`python -m tandem_sdk.serve_environment MODULE:CLASS` serve, print where, refuse what
they cannot run with one line, and stop on SIGINT / SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import textwrap
import time
import unittest

from helpers import PYTHON, REPO, TOKEN, child_env, env_stub, reset, reward_stub, score, step


class Serve:
    """A serving command started with `args`; its address from its first line."""

    def __init__(self, args: list, token_env: str = "TANDEM_REWARD_TOKEN", **env: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, *args],
            env=child_env(**{token_env: TOKEN, **env}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise AssertionError(f"first line {line!r}; stderr: {self.proc.stderr.read()}")
        self.address = line.split()[-1]

    def stop(self, sig: int) -> "tuple[int, float, str]":
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc, time.monotonic() - t0, err


class Commands(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.scorer = os.path.join(self.dir.name, "my_scorer.py")
        with open(self.scorer, "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    def score(completion, answer):
                        return 1.0 if completion.strip() == answer else 0.0

                    def lengths(completions):
                        return [len(c) for c in completions]
                    """
                )
            )

    def test_serve_reward_from_a_file_and_stop_on_sigterm(self) -> None:
        s = Serve(["-m", "tandem_sdk.serve_reward", f"{self.scorer}:score", "--port", "0"])
        self.assertTrue(s.address.startswith("127.0.0.1:"))
        self.assertEqual(score(reward_stub(s.address), ["4", "5"]), [1.0, 0.0])
        rc, took, err = s.stop(signal.SIGTERM)
        self.assertEqual(rc, 0, err)
        self.assertLess(took, 10)
        self.assertIn("SIGTERM", err)

    def test_batched_from_a_module_and_stop_on_sigint(self) -> None:
        s = Serve(
            ["-m", "tandem_sdk.serve_reward", "my_scorer:lengths", "--batched", "--port", "0"],
            PYTHONPATH=os.pathsep.join([child_env()["PYTHONPATH"], self.dir.name]),
        )
        self.assertEqual(score(reward_stub(s.address), ["ab", "abc"]), [2.0, 3.0])
        rc, _, err = s.stop(signal.SIGINT)
        self.assertEqual(rc, 0, err)

    def test_serve_environment_the_example(self) -> None:
        s = Serve(
            ["-m", "tandem_sdk.serve_environment", "examples/envs/guess_number.py:GuessNumber", "--port", "0"],
            token_env="TANDEM_ENV_TOKEN",
        )
        stub = env_stub(s.address)
        reset(stub, "1/0", answer="5")
        self.assertTrue(step(stub, "1/0", "5").done)
        self.assertEqual(s.stop(signal.SIGTERM)[0], 0)

    def test_the_example_as_a_script(self) -> None:
        s = Serve(["examples/envs/guess_number.py", "--port", "0"], token_env="TANDEM_ENV_TOKEN")
        stub = env_stub(s.address)
        reset(stub, "1/0", answer="5")
        self.assertEqual(step(stub, "1/0", "4").observation, "4 is wrong: higher.")
        self.assertEqual(s.stop(signal.SIGTERM)[0], 0)

    def refused(self, args: list, env: dict) -> str:
        p = subprocess.run([PYTHON, *args], env=child_env(**env), capture_output=True, text=True, timeout=60, cwd=REPO)
        self.assertNotEqual(p.returncode, 0)
        self.assertNotIn("Traceback", p.stderr)
        return p.stderr

    def test_what_cannot_run_is_one_line(self) -> None:
        no_token = child_env()
        no_token.pop("TANDEM_REWARD_TOKEN", None)
        p = subprocess.run(
            [PYTHON, "-m", "tandem_sdk.serve_reward", f"{self.scorer}:score"],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("TANDEM_REWARD_TOKEN", p.stderr)
        self.assertIn("at least 16", self.refused(["-m", "tandem_sdk.serve_reward", f"{self.scorer}:score"], {"TANDEM_REWARD_TOKEN": "short"}))
        self.assertIn("has no nope", self.refused(["-m", "tandem_sdk.serve_reward", f"{self.scorer}:nope"], {"TANDEM_REWARD_TOKEN": TOKEN}))
        self.assertIn("MODULE:NAME", self.refused(["-m", "tandem_sdk.serve_reward", "just_a_name"], {"TANDEM_REWARD_TOKEN": TOKEN}))
        self.assertIn("no file", self.refused(["-m", "tandem_sdk.serve_reward", "nowhere/x.py:f"], {"TANDEM_REWARD_TOKEN": TOKEN}))


if __name__ == "__main__":
    unittest.main()
