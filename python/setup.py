"""Build hook of tandem_sdk: the gRPC stubs are generated from the repository's .proto.

`pip install ./python` (from a Tandem checkout) runs grpcio-tools' protoc on every
`tandem/v1/*.proto` under ../proto/proto (relative to this file; TANDEM_PROTO_ROOT
names another folder) and writes the modules into the package being built, as
`tandem_sdk._proto.<name>_pb2` / `<name>_pb2_grpc` (their `from tandem.v1 import …`
made relative). Nothing generated is committed: the stubs always match the `.proto`
of the checkout they were built from.

The generated code checks at import that the installed grpcio and protobuf are at
least the versions that generated it, so the package requires exactly those lower
bounds (read from the generated files), never a guess.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = Path(__file__).resolve().parent
PACKAGE = "tandem_sdk"
STUBS = "_proto"


def proto_root() -> Path:
    """The folder that holds `tandem/v1/*.proto`."""
    env = os.environ.get("TANDEM_PROTO_ROOT")
    return Path(env).resolve() if env else HERE.parent / "proto" / "proto"


def proto_files(root: Path) -> list[Path]:
    files = sorted((root / "tandem" / "v1").glob("*.proto"))
    if not files:
        raise SystemExit(
            f"tandem_sdk: no .proto files at {root / 'tandem' / 'v1'}: the SDK's gRPC stubs are "
            "generated from the Tandem repository's proto/proto/tandem/v1/*.proto at build time. "
            "Build it from a Tandem checkout (`pip install ./python` in the repository root), "
            "or set TANDEM_PROTO_ROOT to the folder that holds tandem/v1/*.proto."
        )
    return files


_IMPORT = re.compile(r"^from tandem\.v1 import (\w+) as (\w+)$", re.MULTILINE)


def generate(out: Path) -> None:
    """Runs protoc on the repository's .proto files and writes the Python modules
    (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`) flat into `out`, imports made relative."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit(
            "tandem_sdk: building needs grpcio-tools (a build requirement in pyproject.toml; "
            f"with --no-build-isolation, pip install grpcio-tools first): {e}"
        )
    root = proto_root()
    files = proto_files(root)
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="tandem-sdk-stubs-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(f.relative_to(root)) for f in files),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"tandem_sdk: protoc failed on {', '.join(map(str, files))} (above)")
        out.mkdir(parents=True, exist_ok=True)
        generated = sorted((Path(tmp) / "tandem" / "v1").iterdir())
        for src in generated:
            text = _IMPORT.sub(r"from . import \1 as \2", src.read_text(encoding="utf-8"))
            if re.search(r"^(from|import) tandem\b", text, re.MULTILINE):
                raise SystemExit(f"tandem_sdk: {src.name} imports `tandem` in a form this build does not rewrite")
            (out / src.name).write_text(text, encoding="utf-8")


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least the versions the stubs were generated for."""
    with tempfile.TemporaryDirectory(prefix="tandem-sdk-versions-") as tmp:
        generate(Path(tmp))
        grpc_text = "".join(p.read_text(encoding="utf-8") for p in Path(tmp).glob("*_pb2_grpc.py"))
        pb_text = "".join(p.read_text(encoding="utf-8") for p in Path(tmp).glob("*_pb2.py"))
    reqs = []
    m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_text)
    reqs.append(f"grpcio>={m.group(1)}" if m else "grpcio")
    m = re.search(r"_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb_text)
    reqs.append(f"protobuf>={m.group(1)}.{m.group(2)}.{m.group(3)}" if m else "protobuf")
    return reqs


class build_py(_build_py):
    """The package's files, then the generated stubs into `tandem_sdk/_proto`."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # An editable install imports the package from this folder.
            out = HERE / PACKAGE / STUBS
        else:
            out = Path(self.build_lib) / PACKAGE / STUBS
        generate(out)
        print(f"tandem_sdk: gRPC stubs generated from {proto_root()} into {out}", file=sys.stderr)


if __name__ == "__main__":
    # A stale build folder could hold stubs of an older .proto.
    shutil.rmtree(HERE / "build", ignore_errors=True)
    setup(cmdclass={"build_py": build_py}, install_requires=runtime_requirements())
