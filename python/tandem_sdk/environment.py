"""An environment class served as Tandem's `tandem.v1.Environment` service.

    from tandem_sdk import Environment, StepResult, serve_environment

    class Echo(Environment):
        def reset(self, prompt: str, answer: str, info: dict) -> str | None:
            self.answer = answer
            return None                       # the dataset prompt as it is

        def step(self, action: str) -> StepResult:
            if action.strip() == self.answer:
                return StepResult("correct", reward=1.0, done=True)
            return StepResult("try again")

    serve_environment(Echo, port=50070)      # token from $TANDEM_ENV_TOKEN

and in the run's config `[env] service = "127.0.0.1:50070"`, `max_turns = …`.

Each sample of a group is an episode: `Reset` makes a new object of the class (any
callable that returns one; subclassing `Environment` is optional), `Step` calls that
object's `step` with the model's turn. Parameters are matched by name: `reset` takes any
of `prompt`, `answer`, `info` (the dataset record's `info` object, `{}` when none) and
`episode_id`; `step` takes `action` (and `episode_id`). `reset` returns the first
observation (None or "" = the dataset prompt as it is; it must be the same for every
sample of a prompt); `step` returns a `StepResult`, or a tuple `(observation, reward,
done)`. An episode is forgotten when `done`, or after `episode_timeout_s` without a call
(an episode cut at `[env] max_turns` gets no last call); `close()` runs then.

A method that raises, returns a non-finite reward or an observation over 1 MiB (Tandem's
OBSERVATION_BYTES) makes the call fail with that message (INTERNAL): Tandem ends that
episode with the error as its last observation. `Step` for an episode that was never
`Reset` (or already ended) fails with NOT_FOUND.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import grpc

from . import _server
from .info import InfoError, read_info
from .stubs import environment_pb2, environment_pb2_grpc

#: The environment variable the token is read from (the generators' name for it).
TOKEN_ENV = "TANDEM_ENV_TOKEN"
#: The longest observation Tandem accepts, in UTF-8 bytes (`limits::OBSERVATION_BYTES`).
OBSERVATION_BYTES = 1 << 20


@dataclass(frozen=True)
class StepResult:
    """The environment's answer to a model turn."""

    #: The message the model reads next (ignored when `done`).
    observation: str = ""
    #: This turn's reward; an episode's rewards are summed. Finite.
    reward: float = 0.0
    #: The episode is over.
    done: bool = False


class Environment:
    """One episode of an environment (subclassing it is optional: any class with `step`
    and optionally `reset` and `close` serves)."""

    def reset(self, prompt: str, answer: str, info: Dict[str, Any]) -> Optional[str]:
        """Starts the episode; the first observation (None = the dataset prompt)."""
        return None

    def step(self, action: str) -> StepResult:
        """Answers the model's turn `action`."""
        raise NotImplementedError

    def close(self) -> None:
        """The episode ended (done, or idle past `episode_timeout_s`)."""


class _Episode:
    __slots__ = ("env", "step", "busy", "last_used")

    def __init__(self, env: Any, step: Callable[[Mapping[str, Any]], Any]) -> None:
        self.env = env
        self.step = step
        # Held from a call's start until its user code returns (even past a deadline),
        # so two calls of one episode never run its methods at once.
        self.busy = threading.Lock()
        self.last_used = time.monotonic()


class _Environment(environment_pb2_grpc.EnvironmentServicer):
    def __init__(
        self,
        factory: Callable[[], Any],
        runner: _server.Runner,
        episode_timeout_s: float,
        max_episodes: int,
    ) -> None:
        if not callable(factory):
            raise _server.SdkError(f"serve_environment needs a class (or a callable making one), got {factory!r}")
        self.factory = factory
        self.name = getattr(factory, "__qualname__", None) or repr(factory)
        self.runner = runner
        self.episode_timeout_s = episode_timeout_s
        self.max_episodes = max_episodes
        self.episodes: Dict[str, _Episode] = {}
        self.lock = threading.Lock()
        # Check the methods' parameters now, on the class, not at the first call.
        if isinstance(factory, type):
            if not callable(getattr(factory, "step", None)):
                raise _server.SdkError(f"{self.name} has no step(action) method")
            for method, offered in (
                ("reset", ("prompt", "answer", "info", "episode_id")),
                ("step", ("action", "episode_id")),
            ):
                fn = getattr(factory, method, None)
                if fn is not None:
                    _server.keyword_caller(_unbound(fn), offered, f"{self.name}.{method}")

    # --- the episode table -------------------------------------------------------

    def _expire(self) -> list:
        """Forgets episodes idle past the timeout; returns them (closed by the caller)."""
        now = time.monotonic()
        old = [k for k, e in self.episodes.items() if now - e.last_used > self.episode_timeout_s]
        return [self.episodes.pop(k) for k in old]

    def _close(self, episodes: list) -> None:
        for e in episodes:
            close = getattr(e.env, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    _server.log.exception("%s.close raised", self.name)

    # --- the RPCs ------------------------------------------------------------------

    def Reset(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _server.handle(context, "Reset", lambda: self._reset(request, context))

    def Step(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _server.handle(context, "Step", lambda: self._step(request, context))

    def _reset(self, request: Any, context: grpc.ServicerContext) -> Any:
        episode_id = request.episode_id
        if not episode_id:
            raise _server.CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "episode_id is empty")
        try:
            info = read_info(request)
        except InfoError as e:
            raise _server.CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        with self.lock:
            gone = self._expire()
            if episode_id not in self.episodes and len(self.episodes) >= self.max_episodes:
                self._close(gone)
                raise _server.CallFailed(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{len(self.episodes)} episodes are open (max_episodes); finished or idle ones are "
                    f"forgotten after {self.episode_timeout_s:.0f} s",
                )
        self._close(gone)
        values = {
            "prompt": request.prompt,
            "answer": request.answer,
            "info": info,
            "episode_id": episode_id,
        }
        what = f"{self.name}.reset"

        def make() -> Tuple[Any, Any]:
            env = self.factory()
            step = getattr(env, "step", None)
            if not callable(step):
                raise _server.UserCodeFailed(f"{self.name}() made a {type(env).__name__} without a step method")
            reset = getattr(env, "reset", None)
            observation = None
            if callable(reset):
                observation = _server.keyword_caller(reset, tuple(values), what)(values)
            return env, observation

        env, observation = self.runner.run(context, what, make)
        text = _observation(observation, what)
        step_call = _server.keyword_caller(env.step, ("action", "episode_id"), f"{self.name}.step")
        with self.lock:
            replaced = self.episodes.pop(episode_id, None)
            self.episodes[episode_id] = _Episode(env, step_call)
        if replaced is not None:
            self._close([replaced])
        return environment_pb2.ResetReply(observation=text)

    def _step(self, request: Any, context: grpc.ServicerContext) -> Any:
        episode_id = request.episode_id
        with self.lock:
            episode = self.episodes.get(episode_id)
            if episode is not None:
                episode.last_used = time.monotonic()
        if episode is None:
            raise _server.CallFailed(
                grpc.StatusCode.NOT_FOUND,
                f"episode_id {episode_id[:200]!r} was never Reset (or it ended, or was idle for "
                f"more than {self.episode_timeout_s:.0f} s)",
            )
        what = f"{self.name}.step"
        limit = self.runner.limit(context)
        if not episode.busy.acquire(timeout=-1 if limit is None else limit):
            raise _server.CallFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"episode {episode_id[:200]!r} is still busy with an earlier call of {what}",
            )
        values = {"action": request.action, "episode_id": episode_id}
        result = self.runner.run(
            context,
            what,
            lambda: episode.step(values),
            on_done=episode.busy.release,
            limit=None if limit is None else self.runner.limit(context),
        )
        observation, reward, done = _step_result(result, what)
        if done:
            with self.lock:
                if self.episodes.get(episode_id) is episode:
                    del self.episodes[episode_id]
            self._close([episode])
        else:
            with self.lock:
                episode.last_used = time.monotonic()
        return environment_pb2.StepReply(observation=observation, reward=reward, done=done)


def _unbound(fn: Any) -> Callable:
    """A method as its instances see it (without `self`), for reading its parameters."""
    import functools

    return functools.partial(fn, None)


def _observation(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _server.CallFailed(
            grpc.StatusCode.INTERNAL, f"{what} returned a {type(value).__name__}: an observation is a str (or None)"
        )
    n = len(value.encode("utf-8", errors="surrogatepass"))
    if n > OBSERVATION_BYTES:
        raise _server.CallFailed(
            grpc.StatusCode.INTERNAL,
            f"{what} returned an observation of {n} bytes; Tandem accepts at most {OBSERVATION_BYTES} (1 MiB)",
        )
    return value


def _step_result(value: Any, what: str) -> Tuple[str, float, bool]:
    if isinstance(value, StepResult):
        observation, reward, done = value.observation, value.reward, value.done
    elif isinstance(value, tuple) and len(value) == 3:
        observation, reward, done = value
    else:
        raise _server.CallFailed(
            grpc.StatusCode.INTERNAL,
            f"{what} returned a {type(value).__name__}: return StepResult(observation, reward, done) "
            "or a tuple (observation, reward, done)",
        )
    try:
        reward = _server.finite(reward, what)
    except _server.UserCodeFailed as e:
        raise _server.CallFailed(grpc.StatusCode.INTERNAL, str(e)) from e
    if not isinstance(done, bool) and type(done).__name__ != "bool_":
        raise _server.CallFailed(grpc.StatusCode.INTERNAL, f"{what} returned done={done!r}: a bool")
    return _observation(observation, what), reward, bool(done)


def environment_server(
    environment: Callable[[], Any],
    *,
    port: int = 0,
    host: str = _server.DEFAULT_HOST,
    token: Optional[str] = None,
    timeout_s: Optional[float] = None,
    episode_timeout_s: float = 3600.0,
    max_episodes: int = 100_000,
    max_workers: int = 8,
    max_message_bytes: int = _server.MAX_MESSAGE_BYTES,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_ca: Optional[str] = None,
) -> _server.Server:
    """Starts `environment` (a class: one object per episode) as a
    `tandem.v1.Environment` service and returns it running; `serve_environment` also
    blocks. `token` defaults to `$TANDEM_ENV_TOKEN`; `episode_timeout_s`: an episode
    without a call for this long is forgotten; `max_episodes`: open episodes at most
    (a `Reset` beyond is refused). The other options are `reward_server`'s."""
    if not episode_timeout_s > 0:
        raise _server.SdkError(f"episode_timeout_s must be > 0, got {episode_timeout_s}")
    if max_episodes < 1:
        raise _server.SdkError(f"max_episodes must be ≥ 1, got {max_episodes}")
    token = _server.resolve_token(token, TOKEN_ENV)
    servicer = _Environment(environment, _server.Runner(timeout_s), episode_timeout_s, max_episodes)
    return _server.start(
        "environment",
        lambda s: environment_pb2_grpc.add_EnvironmentServicer_to_server(servicer, s),
        token=token,
        host=host,
        port=port,
        max_workers=max_workers,
        max_message_bytes=max_message_bytes,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )


def serve_environment(
    environment: Callable[[], Any], *, grace_s: float = _server.DEFAULT_GRACE_S, **options: Any
) -> None:
    """Serves `environment` as a `tandem.v1.Environment` service until SIGINT / SIGTERM
    (calls in flight then get `grace_s` seconds). Prints `listening on HOST:PORT` first.
    Takes the options of `environment_server`."""
    _server.serve_forever(environment_server(environment, **options), grace=grace_s)
