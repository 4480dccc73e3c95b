"""A reward function served as Tandem's `tandem.v1.Reward` service.

    from tandem_sdk import serve_reward

    def score(prompt: str, completion: str, answer: str, info: dict) -> float:
        return 1.0 if completion.strip() == answer else 0.0

    serve_reward(score, port=50060)      # token from $TANDEM_REWARD_TOKEN

and in the run's config `[reward] service = "127.0.0.1:50060"` (the generators send the
same token: `TANDEM_REWARD_TOKEN` or `[reward] service_token`).

A generator makes one `Score` call per group (its prompt, reference answer, `info`, and
every completion); the function is called once per completion, or once per group with
`batched=True` (then it takes `completions` and returns one reward each). Parameters are
matched by name, any subset of `prompt`, `completion` (`completions` when batched),
`answer` and `info` (the dataset record's `info` object, `{}` when the record has none).

A function that raises, returns something that is not a finite number (NaN, None, a
string) or the wrong number of rewards makes the call fail with that message (INTERNAL),
never a silent 0: Tandem retries the call 4 times, then gives the group's prompt back to
be sampled again, and logs the message. A function that has not returned by the call's
deadline (Tandem's `[coordinator] rpc_timeout_s`, 30 s by default, or `timeout_s` here)
fails with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import grpc

from . import _server
from .info import InfoError, read_info
from .stubs import reward_pb2, reward_pb2_grpc

#: The environment variable the token is read from (the generators' name for it).
TOKEN_ENV = "TANDEM_REWARD_TOKEN"

ScoreFn = Callable[..., Any]


class _Reward(reward_pb2_grpc.RewardServicer):
    def __init__(self, fn: ScoreFn, batched: bool, runner: _server.Runner) -> None:
        self.batched = batched
        self.runner = runner
        self.name = getattr(fn, "__qualname__", None) or repr(fn)
        offered = ("prompt", "completions" if batched else "completion", "answer", "info")
        self.call = _server.keyword_caller(fn, offered, self.name)

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _server.handle(context, "Score", lambda: self._score(request, context))

    def _score(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            info = read_info(request)
        except InfoError as e:
            raise _server.CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        completions = list(request.completions)
        if not completions:
            return reward_pb2.ScoreReply(rewards=[])
        base = {"prompt": request.prompt, "answer": request.answer, "info": info}
        n = len(completions)

        def per_completion() -> list[float]:
            out = []
            for i, c in enumerate(completions):
                where = f"{self.name} on completion {i} of {n}"
                try:
                    value = self.call({**base, "completion": c})
                except Exception as e:
                    _server.log.exception("%s raised", where)
                    raise _server.UserCodeFailed(f"{where} raised {_server.describe(e)}") from e
                out.append(_server.finite(value, where))
            return out

        def whole_group() -> list[float]:
            try:
                values = self.call({**base, "completions": completions})
            except Exception as e:
                _server.log.exception("%s raised", self.name)
                raise _server.UserCodeFailed(f"{self.name} raised {_server.describe(e)}") from e
            try:
                values = list(values)
            except TypeError:
                raise _server.UserCodeFailed(
                    f"{self.name} returned a {type(values).__name__}: batched, it returns one reward per completion"
                ) from None
            if len(values) != n:
                raise _server.UserCodeFailed(
                    f"{self.name} returned {len(values)} rewards for {n} completions"
                )
            return [_server.finite(v, f"{self.name} for completion {i}") for i, v in enumerate(values)]

        rewards = self.runner.run(context, self.name, whole_group if self.batched else per_completion)
        return reward_pb2.ScoreReply(rewards=rewards)


def reward_server(
    score: ScoreFn,
    *,
    port: int = 0,
    host: str = _server.DEFAULT_HOST,
    token: Optional[str] = None,
    batched: bool = False,
    timeout_s: Optional[float] = None,
    max_workers: int = 8,
    max_message_bytes: int = _server.MAX_MESSAGE_BYTES,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_ca: Optional[str] = None,
) -> _server.Server:
    """Starts `score` as a `tandem.v1.Reward` service and returns it running (its
    `address` holds the port chosen when `port=0`); `serve_reward` also blocks.

    - `host`: where to listen; loopback unless told (`"0.0.0.0"` for other machines:
      then give it TLS with `tls_cert` / `tls_key`, and `tls_ca` to require client
      certificates signed by that CA, as a run with `[tls] client_auth` presents).
    - `token`: the token every call must carry (`authorization: Bearer <token>`);
      default `$TANDEM_REWARD_TOKEN`. At least 16 characters.
    - `batched`: call `score(completions=[…], …)` once per group instead of once per
      completion.
    - `timeout_s`: longest a call may take (the caller's deadline applies in any case).
    - `max_workers`: calls served at once (groups of several generators); the function
      may run on several threads at once: with `max_workers=1` it never does.
    - `max_message_bytes`: the largest request accepted (a larger one is refused with
      RESOURCE_EXHAUSTED before `score` runs).
    """
    token = _server.resolve_token(token, TOKEN_ENV)
    servicer = _Reward(score, batched, _server.Runner(timeout_s))
    return _server.start(
        "reward",
        lambda s: reward_pb2_grpc.add_RewardServicer_to_server(servicer, s),
        token=token,
        host=host,
        port=port,
        max_workers=max_workers,
        max_message_bytes=max_message_bytes,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )


def serve_reward(score: ScoreFn, *, grace_s: float = _server.DEFAULT_GRACE_S, **options: Any) -> None:
    """Serves `score` as a `tandem.v1.Reward` service until SIGINT / SIGTERM (calls in
    flight then get `grace_s` seconds). Prints `listening on HOST:PORT` first. Takes
    the options of `reward_server`."""
    _server.serve_forever(reward_server(score, **options), grace=grace_s)
