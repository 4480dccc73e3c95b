"""`read_info` before and after the `info` field exists: the SDK's own stubs (no field
yet, or the field once the .proto has it), and requests of the shapes the field can
take (JSON text, a Struct, a map), built as message types of their own."""

from __future__ import annotations

import unittest

from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2

import helpers  # noqa: F401  (quiet logging)
from tandem_sdk.info import InfoError, read_info
from tandem_sdk.stubs import environment_pb2, reward_pb2


def message_classes() -> dict:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FileDescriptorProto(name="info_test.proto", package="infotest", syntax="proto3")
    f.dependency.append("google/protobuf/struct.proto")
    T = descriptor_pb2.FieldDescriptorProto

    def message(name, field, type_, type_name=None, label=T.LABEL_OPTIONAL):
        m = f.message_type.add(name=name)
        m.field.add(name="prompt", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
        fd = m.field.add(name=field, number=4, type=type_, label=label)
        if type_name:
            fd.type_name = type_name
        return m

    message("Text", "info", T.TYPE_STRING)
    message("Bytes", "info", T.TYPE_BYTES)
    message("JsonText", "info_json", T.TYPE_STRING)
    message("Struct", "info", T.TYPE_MESSAGE, ".google.protobuf.Struct")
    m = message("Map", "info", T.TYPE_MESSAGE, ".infotest.Map.InfoEntry", T.LABEL_REPEATED)
    entry = m.nested_type.add(name="InfoEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    pool.Add(f)
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21
        from google.protobuf.message_factory import MessageFactory

        GetMessageClass = MessageFactory(pool).GetPrototype  # type: ignore[assignment]
    return {n: GetMessageClass(pool.FindMessageTypeByName(f"infotest.{n}")) for n in ("Text", "Bytes", "JsonText", "Struct", "Map")}


class ReadInfo(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.types = message_classes()

    def test_the_sdks_own_requests(self) -> None:
        # Whichever .proto the SDK was built from: `{}` without the field or when unset.
        for req in (reward_pb2.ScoreRequest(prompt="p"), environment_pb2.ResetRequest(episode_id="e")):
            self.assertEqual(read_info(req), {})

    def test_json_text(self) -> None:
        T = self.types["Text"]
        self.assertEqual(read_info(T(info='{"a": [1, 2], "b": {"c": null}}')), {"a": [1, 2], "b": {"c": None}})
        self.assertEqual(read_info(T()), {})
        self.assertEqual(read_info(T(info="  ")), {})
        self.assertEqual(read_info(T(info="null")), {})
        self.assertEqual(read_info(self.types["JsonText"](info_json='{"x": 1}')), {"x": 1})
        self.assertEqual(read_info(self.types["Bytes"](info=b'{"x": 2}')), {"x": 2})

    def test_not_an_object(self) -> None:
        T = self.types["Text"]
        for bad in ("[1]", '"s"', "{nope", "3"):
            with self.assertRaises(InfoError):
                read_info(T(info=bad))

    def test_a_struct(self) -> None:
        S = self.types["Struct"]
        self.assertEqual(read_info(S()), {})
        s = S()
        s.info.update({"animals": {"cat": 2}, "n": 3, "ok": True})
        self.assertEqual(read_info(s), {"animals": {"cat": 2}, "n": 3, "ok": True})

    def test_a_map(self) -> None:
        M = self.types["Map"]
        m = M()
        m.info["k"] = "v"
        self.assertEqual(read_info(m), {"k": "v"})
        self.assertEqual(read_info(M()), {})


if __name__ == "__main__":
    unittest.main()
