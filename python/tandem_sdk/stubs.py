"""The generated gRPC modules of `tandem.v1.Reward` and `tandem.v1.Environment`.

They exist only in a built package (`pip install ./python`): running the SDK from the
source folder (PYTHONPATH=python) finds none, and this module says so.
"""

from __future__ import annotations

try:
    from ._proto import environment_pb2, environment_pb2_grpc, reward_pb2, reward_pb2_grpc
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "tandem_sdk's gRPC stubs are missing: they are generated from the repository's "
        "proto/proto/tandem/v1/*.proto when the package is built. Install it with "
        f"`pip install ./python` from a Tandem checkout rather than importing the source folder ({e})"
    ) from e

__all__ = ["environment_pb2", "environment_pb2_grpc", "reward_pb2", "reward_pb2_grpc"]
