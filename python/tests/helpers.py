"""What the SDK's tests share: the token, clients of a running service, the repository."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import grpc

import tandem_sdk

# The services log every refused call; the tests check the statuses instead
# (TANDEM_SDK_TEST_LOG=1 shows the log).
if not os.environ.get("TANDEM_SDK_TEST_LOG"):
    import logging

    logging.getLogger("tandem_sdk").setLevel(logging.CRITICAL)
from tandem_sdk.stubs import environment_pb2, environment_pb2_grpc, reward_pb2, reward_pb2_grpc

TOKEN = "sdk-test-token-0123456789"
AUTH = [("authorization", f"Bearer {TOKEN}")]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


def sdk_path() -> str:
    """The folder the tested tandem_sdk is imported from (for child processes)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(tandem_sdk.__file__)))


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (sdk_path(), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def reward_stub(address: str) -> Any:
    return reward_pb2_grpc.RewardStub(grpc.insecure_channel(address))


def env_stub(address: str) -> Any:
    return environment_pb2_grpc.EnvironmentStub(grpc.insecure_channel(address))


def score(stub: Any, completions: list, prompt: str = "2 + 2 =", answer: str = "4", timeout: float = 10.0, info_json: str = "", **kw: Any) -> list:
    reply = stub.Score(
        reward_pb2.ScoreRequest(prompt=prompt, answer=answer, completions=completions, info_json=info_json),
        metadata=kw.pop("metadata", AUTH),
        timeout=timeout,
        **kw,
    )
    return list(reply.rewards)


def reset(stub: Any, episode: str, prompt: str = "p", answer: str = "", timeout: float = 10.0, info_json: str = "") -> str:
    return stub.Reset(
        environment_pb2.ResetRequest(episode_id=episode, prompt=prompt, answer=answer, info_json=info_json),
        metadata=AUTH,
        timeout=timeout,
    ).observation


def step(stub: Any, episode: str, action: str, timeout: float = 10.0) -> Any:
    return stub.Step(environment_pb2.StepRequest(episode_id=episode, action=action), metadata=AUTH, timeout=timeout)


def used_port() -> "tuple[socket.socket, int]":
    """A socket listening on a loopback port (keep it open while the port must be taken)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]
