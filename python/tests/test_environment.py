"""tandem_sdk's Environment service: one object per episode, the token check, failures as
gRPC errors, episodes that end or go idle forgotten; and examples/envs/guess_number.py."""

from __future__ import annotations

import math
import os
import threading
import time
import unittest

import grpc

from helpers import REPO, TOKEN, env_stub, reset, step
from tandem_sdk import Environment, SdkError, StepResult, environment_server
from tandem_sdk._cli import load
from tandem_sdk.stubs import environment_pb2


class Countdown(Environment):
    """Ends after `answer` turns; each turn's reward is the length of the action."""

    closed: list = []

    def reset(self, prompt, answer, info, episode_id):
        self.left = int(answer or 2)
        self.episode_id = episode_id
        self.info = info
        return f"count {self.left} for {prompt}"

    def step(self, action):
        self.left -= 1
        return StepResult(f"{self.left} left", reward=len(action), done=self.left == 0)

    def close(self):
        Countdown.closed.append(self.episode_id)


class Episodes(unittest.TestCase):
    def setUp(self) -> None:
        Countdown.closed = []
        self.server = environment_server(Countdown, token=TOKEN)
        self.stub = env_stub(self.server.address)

    def tearDown(self) -> None:
        self.server.stop(0)

    def test_an_episode_from_reset_to_done(self) -> None:
        self.assertEqual(reset(self.stub, "1/0", prompt="q", answer="2"), "count 2 for q")
        r = step(self.stub, "1/0", "abc")
        self.assertEqual((r.observation, r.reward, r.done), ("1 left", 3.0, False))
        r = step(self.stub, "1/0", "ab")
        self.assertEqual((r.reward, r.done), (2.0, True))
        self.assertEqual(Countdown.closed, ["1/0"])
        # Ended: forgotten.
        with self.assertRaises(grpc.RpcError) as e:
            step(self.stub, "1/0", "a")
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_episodes_are_separate_objects(self) -> None:
        reset(self.stub, "7/0", answer="3")
        reset(self.stub, "7/1", answer="1")
        self.assertTrue(step(self.stub, "7/1", "x").done)
        self.assertFalse(step(self.stub, "7/0", "x").done)

    def test_the_records_info_reaches_reset(self) -> None:
        seen = []

        class Leveled(Environment):
            def reset(self, prompt, info):
                seen.append(info)
                return f"level {info.get('level', '?')}"

            def step(self, action):
                return StepResult("", reward=1.0, done=True)

        server = environment_server(Leveled, token=TOKEN)
        try:
            stub = env_stub(server.address)
            self.assertEqual(reset(stub, "9/0", info_json='{"level": 4}'), "level 4")
            self.assertEqual(reset(stub, "9/1"), "level ?")
            with self.assertRaises(grpc.RpcError) as e:
                reset(stub, "9/2", info_json='"four"')
            self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("info_json", e.exception.details())
            self.assertEqual(seen, [{"level": 4}, {}])
        finally:
            server.stop(0)

    def test_a_step_without_reset(self) -> None:
        with self.assertRaises(grpc.RpcError) as e:
            step(self.stub, "never", "x")
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("never Reset", e.exception.details())

    def test_an_empty_episode_id(self) -> None:
        with self.assertRaises(grpc.RpcError) as e:
            reset(self.stub, "")
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_tokens(self) -> None:
        for metadata in ([], [("authorization", "Bearer not-the-token-at-all")]):
            with self.assertRaises(grpc.RpcError) as e:
                self.stub.Reset(environment_pb2.ResetRequest(episode_id="a"), metadata=metadata, timeout=10)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(Countdown.closed, [])

    def test_a_malformed_request(self) -> None:
        raw = grpc.insecure_channel(self.server.address).unary_unary(
            "/tandem.v1.Environment/Step", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        from helpers import AUTH

        with self.assertRaises(grpc.RpcError):
            raw(b"\x0a\xff\xff\xff\xff\x0f", metadata=AUTH, timeout=10)
        self.assertEqual(reset(self.stub, "ok", answer="1"), "count 1 for p")


class Failures(unittest.TestCase):
    def call_fails(self, cls, do, code=grpc.StatusCode.INTERNAL, **options) -> str:
        with environment_server(cls, token=TOKEN, **options) as s:
            stub = env_stub(s.address)
            with self.assertRaises(grpc.RpcError) as e:
                do(stub)
            self.assertEqual(e.exception.code(), code, e.exception.details())
            return e.exception.details()

    def test_a_step_that_raises(self) -> None:
        class Broken(Environment):
            def step(self, action):
                raise KeyError("no such move")

        said = self.call_fails(Broken, lambda st: (reset(st, "e"), step(st, "e", "x")))
        self.assertIn("Broken.step raised KeyError", said)
        self.assertIn("no such move", said)

    def test_a_reset_that_raises(self) -> None:
        class Broken(Environment):
            def reset(self, prompt):
                raise RuntimeError("no dataset")

            def step(self, action):
                return StepResult()

        self.assertIn("no dataset", self.call_fails(Broken, lambda st: reset(st, "e")))

    def test_non_finite_rewards_and_bad_results(self) -> None:
        for result, says in (
            (StepResult("o", reward=math.nan), "nan"),
            (("o", math.inf, False), "inf"),
            (("o", None, True), "None"),
            ("just text", "return StepResult"),
            (("o", 1.0, "yes"), "done='yes'"),
            (StepResult("x" * ((1 << 20) + 1)), "1048577 bytes"),
        ):

            class Bad(Environment):
                def step(self, action, result=result):
                    return result

            said = self.call_fails(Bad, lambda st: (reset(st, "e"), step(st, "e", "x")))
            self.assertIn(says, said)

    def test_an_observation_that_is_not_text(self) -> None:
        class Bad(Environment):
            def reset(self):
                return 42

            def step(self, action):
                return StepResult()

        self.assertIn("returned a int", self.call_fails(Bad, lambda st: reset(st, "e")))

    def test_a_class_without_step_is_refused_at_start(self) -> None:
        class NoStep:
            def reset(self):
                return None

        with self.assertRaisesRegex(SdkError, "no step"):
            environment_server(NoStep, token=TOKEN)

        class Odd(Environment):
            def step(self, move):
                return StepResult()

        with self.assertRaisesRegex(SdkError, "'move' is not one Tandem passes"):
            environment_server(Odd, token=TOKEN)

    def test_a_step_that_hangs(self) -> None:
        release = threading.Event()
        calls = []

        class Slow(Environment):
            def step(self, action):
                calls.append(action)
                if action == "hang":
                    release.wait(30)
                return StepResult("done", done=action == "end")

        with environment_server(Slow, token=TOKEN) as s:
            stub = env_stub(s.address)
            reset(stub, "e")
            with self.assertRaises(grpc.RpcError) as e:
                step(stub, "e", "hang", timeout=0.5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            # The episode's object is still busy: a second call of it waits its own
            # deadline, and never runs beside the first.
            with self.assertRaises(grpc.RpcError) as e:
                step(stub, "e", "again", timeout=0.5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertEqual(calls, ["hang"])
            # Other episodes go on.
            reset(stub, "f")
            self.assertTrue(step(stub, "f", "end").done)
            release.set()
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.assertFalse(step(stub, "e", "after", timeout=1).done)
                    break
                except grpc.RpcError:
                    self.assertLess(time.monotonic(), deadline)

    def test_idle_episodes_are_forgotten(self) -> None:
        Countdown.closed = []
        with environment_server(Countdown, token=TOKEN, episode_timeout_s=0.2) as s:
            stub = env_stub(s.address)
            reset(stub, "old", answer="5")
            time.sleep(0.4)
            reset(stub, "new", answer="5")
            self.assertEqual(Countdown.closed, ["old"])
            with self.assertRaises(grpc.RpcError) as e:
                step(stub, "old", "x")
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_open_episodes_are_bounded(self) -> None:
        with environment_server(Countdown, token=TOKEN, max_episodes=2) as s:
            stub = env_stub(s.address)
            reset(stub, "a", answer="5")
            reset(stub, "b", answer="5")
            reset(stub, "a", answer="5")  # again: replaces, does not add
            with self.assertRaises(grpc.RpcError) as e:
                reset(stub, "c", answer="5")
            self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)


class GuessNumber(unittest.TestCase):
    """examples/envs/guess_number.py on the SDK plays as it always did."""

    def test_the_game(self) -> None:
        game = load(os.path.join(REPO, "examples", "envs", "guess_number.py") + ":GuessNumber")
        with environment_server(game, token=TOKEN) as s:
            stub = env_stub(s.address)
            first = reset(stub, "3/0", answer="42")
            self.assertEqual(first, "Guess my number, from 0 to 99. Answer with one number.")
            self.assertEqual(reset(stub, "3/1", answer="42"), first)
            self.assertEqual(step(stub, "3/0", "I think so").observation, "Say a number from 0 to 99.")
            r = step(stub, "3/0", "maybe 10?")
            self.assertEqual((r.observation, r.reward, r.done), ("10 is wrong: higher.", 0.0, False))
            self.assertEqual(step(stub, "3/0", "77").observation, "77 is wrong: lower.")
            r = step(stub, "3/0", "42")
            self.assertEqual((r.observation, r.reward, r.done), ("correct", 1.0, True))
            # Not a number below 100: a secret drawn from the episode id, found by bisection.
            reset(stub, "9/2", answer="not a number")
            lo, hi = 0, 99
            for _ in range(8):
                guess = (lo + hi) // 2
                r = step(stub, "9/2", str(guess))
                if r.done:
                    break
                lo, hi = (guess + 1, hi) if "higher" in r.observation else (lo, guess - 1)
            self.assertTrue(r.done and r.reward == 1.0)


if __name__ == "__main__":
    unittest.main()
