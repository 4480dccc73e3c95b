"""tandem_sdk's Reward service: scores as the function gives them, the token check, and
every way a call can go wrong ending as a gRPC error that names it."""

from __future__ import annotations

import math
import threading
import time
import unittest

import grpc

from helpers import AUTH, TOKEN, reward_stub, score, used_port
from tandem_sdk import SdkError, reward_server
from tandem_sdk._server import Runner
from tandem_sdk.stubs import reward_pb2


def exact(prompt: str, completion: str, answer: str, info: dict) -> float:
    return 1.0 if completion.strip() == answer else 0.0


class Scoring(unittest.TestCase):
    def test_each_completion_is_scored_in_order(self) -> None:
        seen = []

        def f(prompt: str, completion: str, answer: str, info: dict) -> float:
            seen.append((prompt, completion, answer, info))
            return exact(prompt, completion, answer, info)

        with reward_server(f, token=TOKEN) as s:
            self.assertEqual(score(reward_stub(s.address), ["4", " 4 ", "5"]), [1.0, 1.0, 0.0])
        # A record without info: the function gets an empty object.
        self.assertEqual(seen[0], ("2 + 2 =", "4", "4", {}))

    def test_the_records_info_reaches_the_function(self) -> None:
        seen = []

        def f(completion: str, info: dict) -> float:
            seen.append(info)
            return float(info["level"])

        with reward_server(f, token=TOKEN) as s:
            stub = reward_stub(s.address)
            self.assertEqual(score(stub, ["a", "b"], info_json='{"level": 3, "tags": ["x"]}'), [3.0, 3.0])
            self.assertEqual(seen, [{"level": 3, "tags": ["x"]}] * 2)
            # Not one JSON object: refused by name, the function never called.
            with self.assertRaises(grpc.RpcError) as e:
                score(stub, ["a"], info_json="[3]")
            self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("info_json", e.exception.details())
            self.assertEqual(len(seen), 2)

    def test_parameters_are_matched_by_name(self) -> None:
        def f(answer, completion):  # any subset, any order
            return float(len(completion)) - float(answer)

        with reward_server(f, token=TOKEN) as s:
            self.assertEqual(score(reward_stub(s.address), ["abcdef"]), [2.0])

        def g(completion, **rest):
            return 1.0 if set(rest) == {"prompt", "answer", "info"} else 0.0

        with reward_server(g, token=TOKEN) as s:
            self.assertEqual(score(reward_stub(s.address), ["x"]), [1.0])

    def test_a_parameter_tandem_does_not_pass_is_refused_at_start(self) -> None:
        def f(completion, reference):
            return 0.0

        with self.assertRaisesRegex(SdkError, "'reference' is not one Tandem passes"):
            reward_server(f, token=TOKEN)

    def test_batched_scores_a_group_in_one_call(self) -> None:
        calls = []

        def f(completions, answer):
            calls.append(list(completions))
            return [float(c == answer) for c in completions]

        with reward_server(f, token=TOKEN, batched=True) as s:
            self.assertEqual(score(reward_stub(s.address), ["4", "5", "4"]), [1.0, 0.0, 1.0])
        self.assertEqual(calls, [["4", "5", "4"]])

    def test_numbers_of_other_types_are_rewards(self) -> None:
        with reward_server(lambda completion: len(completion) > 1, token=TOKEN) as s:
            self.assertEqual(score(reward_stub(s.address), ["ab", "a"]), [1.0, 0.0])

    def test_an_empty_group_needs_no_call(self) -> None:
        def f(completion):
            raise AssertionError("called")

        with reward_server(f, token=TOKEN) as s:
            self.assertEqual(score(reward_stub(s.address), []), [])

    def test_loopback_by_default(self) -> None:
        with reward_server(exact, token=TOKEN) as s:
            self.assertEqual(s.host, "127.0.0.1")
            self.assertTrue(s.address.startswith("127.0.0.1:"))

    def test_a_port_in_use_is_an_error(self) -> None:
        sock, port = used_port()
        with sock:
            with self.assertRaisesRegex(SdkError, "cannot listen"):
                reward_server(exact, token=TOKEN, port=port)


class Tokens(unittest.TestCase):
    def setUp(self) -> None:
        self.calls = 0

        def f(completion):
            self.calls += 1
            return 1.0

        self.server = reward_server(f, token=TOKEN)
        self.stub = reward_stub(self.server.address)

    def tearDown(self) -> None:
        self.server.stop(0)

    def refused(self, metadata) -> grpc.RpcError:
        with self.assertRaises(grpc.RpcError) as e:
            score(self.stub, ["x"], metadata=metadata)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED, e.exception.details())
        return e.exception

    def test_a_call_without_a_token_is_refused(self) -> None:
        self.assertIn("authorization", self.refused([]).details())
        self.assertEqual(self.calls, 0)

    def test_a_wrong_token_is_refused(self) -> None:
        for bad in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, f"bearer {TOKEN}", "Bearer "):
            self.assertEqual(self.refused([("authorization", bad)]).details(), "wrong token")
        self.assertEqual(self.calls, 0)
        self.assertEqual(score(self.stub, ["x"]), [1.0])

    def test_no_token_no_service(self) -> None:
        import os

        old = os.environ.pop("TANDEM_REWARD_TOKEN", None)
        try:
            with self.assertRaisesRegex(SdkError, "TANDEM_REWARD_TOKEN"):
                reward_server(exact)
            with self.assertRaisesRegex(SdkError, "at least 16"):
                reward_server(exact, token="short")
            os.environ["TANDEM_REWARD_TOKEN"] = TOKEN
            with reward_server(exact) as s:
                self.assertEqual(score(reward_stub(s.address), ["4"]), [1.0])
        finally:
            os.environ.pop("TANDEM_REWARD_TOKEN", None)
            if old is not None:
                os.environ["TANDEM_REWARD_TOKEN"] = old


class Failures(unittest.TestCase):
    """A failing function is an error with its message, never a reward of 0."""

    def failing(self, f, completions=("a", "b"), **options) -> grpc.RpcError:
        with reward_server(f, token=TOKEN, **options) as s:
            stub = reward_stub(s.address)
            with self.assertRaises(grpc.RpcError) as e:
                score(stub, list(completions))
            # The service goes on serving.
            s2 = reward_server(exact, token=TOKEN)
            with s2:
                self.assertEqual(score(reward_stub(s2.address), ["4"]), [1.0])
            return e.exception

    def test_a_function_that_raises(self) -> None:
        def f(completion):
            if completion == "b":
                raise ValueError("cannot parse 'b'")
            return 1.0

        e = self.failing(f)
        self.assertEqual(e.code(), grpc.StatusCode.INTERNAL)
        self.assertIn("completion 1 of 2", e.details())
        self.assertIn("ValueError: cannot parse 'b'", e.details())

    def test_non_finite_and_non_numbers(self) -> None:
        for bad, says in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (None, "None"), ("1.0", "'1.0'"), ([1.0], "list")):
            e = self.failing(lambda completion, bad=bad: bad)
            self.assertEqual(e.code(), grpc.StatusCode.INTERNAL, bad)
            self.assertIn(says, e.details())
            self.assertIn("completion 0 of 2", e.details())

    def test_batched_with_the_wrong_count_or_a_nan(self) -> None:
        e = self.failing(lambda completions: [1.0], batched=True)
        self.assertIn("returned 1 rewards for 2 completions", e.details())
        e = self.failing(lambda completions: [1.0, float("nan")], batched=True)
        self.assertIn("nan", e.details())
        e = self.failing(lambda completions: 1.0, batched=True)
        self.assertIn("one reward per completion", e.details())

    def test_a_function_that_hangs_past_the_deadline(self) -> None:
        release = threading.Event()

        def f(completion):
            if completion == "hang":
                release.wait(30)
            return 1.0

        with reward_server(f, token=TOKEN) as s:
            stub = reward_stub(s.address)
            t0 = time.monotonic()
            with self.assertRaises(grpc.RpcError) as e:
                score(stub, ["hang"], timeout=0.5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertLess(time.monotonic() - t0, 5)
            # Other calls are answered meanwhile.
            self.assertEqual(score(stub, ["ok"]), [1.0])
            release.set()

    def test_timeout_s_bounds_a_call_without_a_deadline(self) -> None:
        release = threading.Event()
        with reward_server(lambda completion: release.wait(30) and 1.0, token=TOKEN, timeout_s=0.3) as s:
            stub = reward_stub(s.address)
            with self.assertRaises(grpc.RpcError) as e:
                stub.Score(reward_pb2.ScoreRequest(completions=["x"]), metadata=AUTH)  # no deadline
            self.assertEqual(e.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertIn("did not return within", e.exception.details())
            release.set()

    def test_calls_stuck_past_their_deadline_are_bounded(self) -> None:
        release = threading.Event()
        runner = Runner(timeout_s=0.05, max_stuck=2)

        class Context:
            def time_remaining(self):
                return None

        for _ in range(2):
            with self.assertRaises(Exception) as e:
                runner.run(Context(), "f", lambda: release.wait(30))
            self.assertEqual(e.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        with self.assertRaises(Exception) as e:
            runner.run(Context(), "f", lambda: 1)
        self.assertEqual(e.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        release.set()
        deadline = time.monotonic() + 5
        while runner._stuck and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(runner.run(Context(), "f", lambda: 7), 7)


class Abuse(unittest.TestCase):
    """Requests no generator would send get an error, and the service goes on."""

    def setUp(self) -> None:
        self.server = reward_server(exact, token=TOKEN, max_message_bytes=1 << 20)
        self.channel = grpc.insecure_channel(self.server.address)

    def tearDown(self) -> None:
        self.channel.close()
        self.server.stop(0)

    def still_serving(self) -> None:
        self.assertEqual(score(reward_stub(self.server.address), ["4"]), [1.0])

    def test_a_huge_request(self) -> None:
        with self.assertRaises(grpc.RpcError) as e:
            score(reward_stub(self.server.address), ["x" * (2 << 20)])
        self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.still_serving()

    def test_many_completions(self) -> None:
        self.assertEqual(len(score(reward_stub(self.server.address), ["4"] * 20000)), 20000)

    def test_a_malformed_request(self) -> None:
        raw = self.channel.unary_unary(
            "/tandem.v1.Reward/Score",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x1a\xff\xff\xff\x0f", bytes(range(256))):
            with self.assertRaises(grpc.RpcError) as e:
                raw(garbage, metadata=AUTH, timeout=10)
            self.assertIn(e.exception.code(), (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT))
        self.still_serving()

    def test_invalid_utf8_in_a_string_field(self) -> None:
        raw = self.channel.unary_unary(
            "/tandem.v1.Reward/Score", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with self.assertRaises(grpc.RpcError):
            raw(b"\x1a\x02\xc3\x28", metadata=AUTH, timeout=10)  # completions = [invalid UTF-8]
        self.still_serving()

    def test_unknown_fields_are_ignored(self) -> None:
        # A newer Tandem's fields (field 15, JSON text) reach an SDK built before them.
        raw = self.channel.unary_unary(
            "/tandem.v1.Reward/Score",
            request_serializer=lambda b: b,
            response_deserializer=reward_pb2.ScoreReply.FromString,
        )
        body = reward_pb2.ScoreRequest(answer="4", completions=["4"]).SerializeToString() + b"\x7a\x02{}"
        self.assertEqual(list(raw(body, metadata=AUTH, timeout=10).rewards), [1.0])

    def test_an_unknown_method(self) -> None:
        raw = self.channel.unary_unary("/tandem.v1.Reward/Nope", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with self.assertRaises(grpc.RpcError) as e:
            raw(b"", metadata=AUTH, timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.still_serving()


if __name__ == "__main__":
    unittest.main()
