"""`read_info` on the SDK's own request types: the `info_json` Tandem sends."""

from __future__ import annotations

import unittest

import helpers  # noqa: F401  (quiet logging)
from tandem_sdk.info import InfoError, read_info
from tandem_sdk.stubs import environment_pb2, reward_pb2

REQUESTS = (reward_pb2.ScoreRequest, environment_pb2.ResetRequest)


class ReadInfo(unittest.TestCase):
    def test_none_is_an_empty_object(self) -> None:
        for T in REQUESTS:
            self.assertEqual(read_info(T()), {})
            self.assertEqual(read_info(T(info_json="  ")), {})

    def test_an_object(self) -> None:
        for T in REQUESTS:
            got = read_info(T(info_json='{"a": [1, 2], "b": {"c": null}, "level": 3}'))
            self.assertEqual(got, {"a": [1, 2], "b": {"c": None}, "level": 3})

    def test_anything_else_is_refused_by_name(self) -> None:
        for T in REQUESTS:
            for bad in ("[1, 2]", '"text"', "3", "null", "{not json", '{"a": 1} {"b": 2}'):
                with self.assertRaises(InfoError) as e:
                    read_info(T(info_json=bad))
                self.assertIn("info_json", str(e.exception))


if __name__ == "__main__":
    unittest.main()
