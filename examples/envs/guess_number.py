#!/usr/bin/env python3
"""A Tandem Environment service in Python: a number-guessing game.

Each episode hides a number from 0 to 99 (the dataset answer when it is a number in
that range, else one drawn from the episode id). Every model turn is a guess: the
first integer in the text. The environment answers "higher", "lower" or "correct";
a correct guess scores 1 and ends the episode, every other turn scores 0. A turn
without a number is told to give one.

    pip install grpcio grpcio-tools
    TANDEM_ENV_TOKEN=... python3 examples/envs/guess_number.py --port 50070

then in the run's config:

    [env]
    service = "127.0.0.1:50070"
    max_turns = 6

The gRPC stubs are generated at start from proto/proto/tandem/v1/environment.proto
(the source of truth), so this file needs nothing but grpcio and grpcio-tools.
"""

import argparse
import hashlib
import os
import re
import sys
import tempfile
import threading
from concurrent import futures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_ROOT = os.path.join(REPO, "proto", "proto")


def stubs():
    """Generates the Python stubs of environment.proto into a temporary folder."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tandem-env-stubs-")
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tandem/v1/environment.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO_ROOT}/tandem/v1/environment.proto")
    sys.path.insert(0, out)
    from tandem.v1 import environment_pb2, environment_pb2_grpc

    return environment_pb2, environment_pb2_grpc


def secret_of(episode_id, answer):
    answer = answer.strip()
    if answer.isdigit() and int(answer) < 100:
        return int(answer)
    return int(hashlib.sha256(episode_id.encode()).hexdigest(), 16) % 100


def serve(port, token):
    import grpc

    pb, pb_grpc = stubs()

    class Game(pb_grpc.EnvironmentServicer):
        def __init__(self):
            self.lock = threading.Lock()
            self.secrets = {}

        def Reset(self, request, context):
            with self.lock:
                self.secrets[request.episode_id] = secret_of(request.episode_id, request.answer)
            return pb.ResetReply(observation="Guess my number, from 0 to 99. Answer with one number.")

        def Step(self, request, context):
            with self.lock:
                secret = self.secrets.get(request.episode_id)
            if secret is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"episode_id: {request.episode_id!r} was never Reset")
            m = re.search(r"-?\d+", request.action)
            if m is None:
                return pb.StepReply(observation="Say a number from 0 to 99.", reward=0.0, done=False)
            guess = int(m.group())
            if guess == secret:
                with self.lock:
                    self.secrets.pop(request.episode_id, None)
                return pb.StepReply(observation="correct", reward=1.0, done=True)
            hint = "higher" if guess < secret else "lower"
            return pb.StepReply(observation=f"{guess} is wrong: {hint}.", reward=0.0, done=False)

    class Auth(grpc.ServerInterceptor):
        """Refuses a call without `authorization: Bearer <token>`."""

        def __init__(self):
            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token")

            self.deny = grpc.unary_unary_rpc_method_handler(deny)

        def intercept_service(self, continuation, details):
            if dict(details.invocation_metadata).get("authorization") == f"Bearer {token}":
                return continuation(details)
            return self.deny

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[Auth()])
    pb_grpc.add_EnvironmentServicer_to_server(Game(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    args = ap.parse_args()
    token = os.environ.get("TANDEM_ENV_TOKEN", "")
    if len(token) < 16:
        sys.exit("set TANDEM_ENV_TOKEN to a token of at least 16 characters")
    serve(args.port, token)


if __name__ == "__main__":
    main()
