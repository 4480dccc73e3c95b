"""What the Reward and Environment services share: the token check, the server and its
options, running the user's code within the call's deadline, errors as gRPC statuses,
and serving until SIGINT / SIGTERM."""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
from concurrent import futures
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import grpc

log = logging.getLogger("tandem_sdk")

#: Where a service listens unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
#: The shortest token accepted (Tandem's own `auth::MIN_TOKEN_LEN`).
MIN_TOKEN_LEN = 16
#: The largest request or reply, in bytes (Tandem's `MAX_MESSAGE_BYTES`): a larger
#: request is refused with RESOURCE_EXHAUSTED before any handler runs.
MAX_MESSAGE_BYTES = 64 << 20
#: Longest status message sent back (the rest is cut; the full text is logged here).
MAX_STATUS_CHARS = 2000
#: Calls of the user's code still running past their deadline before new calls are
#: refused (RESOURCE_EXHAUSTED): a function that hangs cannot take every thread.
MAX_STUCK_CALLS = 32
#: Seconds calls in flight get to finish after SIGINT / SIGTERM.
DEFAULT_GRACE_S = 5.0


class SdkError(Exception):
    """A service cannot start as configured (no token, a port in use, …)."""


class CallFailed(Exception):
    """A call ends with this gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UserCodeFailed(Exception):
    """The user's function raised or returned something unusable; the message says which."""


def resolve_token(token: Optional[str], env_var: str) -> str:
    """`token`, else `$env_var`; refused when missing or shorter than `MIN_TOKEN_LEN`."""
    source = "token=" if token is not None else f"${env_var}"
    value = token if token is not None else os.environ.get(env_var, "")
    if not value:
        raise SdkError(
            f"no token: set {env_var} (the same value the run gives the generators as "
            f"{env_var} or the config's service_token), or pass token=; a service never runs "
            "without one"
        )
    if len(value) < MIN_TOKEN_LEN:
        raise SdkError(
            f"{source} has {len(value)} characters: a token needs at least {MIN_TOKEN_LEN} "
            "(openssl rand -hex 32 makes one)"
        )
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise SdkError(f"{source} must be printable ASCII (it travels in an HTTP header)") from None
    if not value.isprintable():
        raise SdkError(f"{source} must be printable ASCII (it travels in an HTTP header)")
    return value


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses, before any handler runs, a call without `authorization: Bearer <token>`
    (UNAUTHENTICATED), comparing in constant time as Tandem's servers do."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def missing(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing `authorization: Bearer <token>` metadata",
            )

        def wrong(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong token")

        self._missing = grpc.unary_unary_rpc_method_handler(missing)
        self._wrong = grpc.unary_unary_rpc_method_handler(wrong)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        got = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                break
        if got is None:
            return self._missing
        if not hmac.compare_digest(got, self._expected):
            return self._wrong
        return continuation(details)


def cut(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`text` of at most `limit` characters (a status message travels in a header)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Runner:
    """Runs the user's code for one call within that call's time: the client's deadline
    (Tandem sends one with every call: `[coordinator] rpc_timeout_s`), or `timeout_s`
    when it is shorter. A call past its time ends DEADLINE_EXCEEDED and its thread is
    left to finish (Python cannot stop a thread); while `MAX_STUCK_CALLS` such threads
    still run, new calls are refused rather than piling up."""

    def __init__(self, timeout_s: Optional[float], max_stuck: int = MAX_STUCK_CALLS) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise SdkError(f"timeout_s must be > 0 (or None), got {timeout_s}")
        self.timeout_s = timeout_s
        self.max_stuck = max_stuck
        self._stuck = 0
        self._lock = threading.Lock()

    def limit(self, context: grpc.ServicerContext) -> Optional[float]:
        """Seconds the call may still take (None: no limit)."""
        remaining = context.time_remaining()
        limits = [t for t in (self.timeout_s, remaining) if t is not None]
        return max(0.0, min(limits)) if limits else None

    def run(
        self,
        context: grpc.ServicerContext,
        what: str,
        fn: Callable[[], Any],
        on_done: Optional[Callable[[], None]] = None,
        limit: Optional[float] = None,
    ) -> Any:
        """`fn()`'s result; `CallFailed` when it raised (INTERNAL, with its message), or
        did not return in time (DEADLINE_EXCEEDED). `on_done` runs when `fn` ends,
        whenever that is; `limit` overrides `self.limit(context)`."""
        if limit is None:
            limit = self.limit(context)
        if limit is None:
            try:
                return fn()
            except UserCodeFailed as e:
                raise CallFailed(grpc.StatusCode.INTERNAL, str(e)) from e
            except Exception as e:
                log.error("%s raised:\n%s", what, traceback.format_exc())
                raise CallFailed(grpc.StatusCode.INTERNAL, f"{what} raised {describe(e)}") from e
            finally:
                if on_done is not None:
                    on_done()
        with self._lock:
            refuse = self._stuck >= self.max_stuck
            stuck = self._stuck
        if refuse:
            if on_done is not None:
                on_done()
            raise CallFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{stuck} earlier calls of {what} are still running past their deadline; "
                "new calls are refused until they return",
            )
        box: dict[str, Any] = {}
        finished = threading.Event()
        abandoned = [False]

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                box["error"] = e
                box["trace"] = traceback.format_exc()
            finally:
                if on_done is not None:
                    on_done()
                with self._lock:
                    finished.set()
                    if abandoned[0]:
                        self._stuck -= 1
                        log.warning("%s returned after its call's deadline had passed", what)

        threading.Thread(target=target, name=f"tandem-sdk {what}", daemon=True).start()
        finished.wait(limit)
        with self._lock:
            if not finished.is_set():
                abandoned[0] = True
                self._stuck += 1
                raise CallFailed(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{what} did not return within {limit:.3g} s (the call's deadline"
                    + (f" or timeout_s={self.timeout_s}" if self.timeout_s is not None else "")
                    + ")",
                )
        if "error" in box:
            e = box["error"]
            if isinstance(e, UserCodeFailed):
                raise CallFailed(grpc.StatusCode.INTERNAL, str(e)) from e
            log.error("%s raised:\n%s", what, box["trace"])
            raise CallFailed(grpc.StatusCode.INTERNAL, f"{what} raised {describe(e)}") from e
        return box.get("value")


def handle(context: grpc.ServicerContext, method: str, body: Callable[[], Any]) -> Any:
    """Runs a handler's `body`; a `CallFailed` becomes the call's status (and a log line)."""
    try:
        return body()
    except CallFailed as e:
        log.warning("%s: %s: %s", method, e.code.name, e.message)
        context.abort(e.code, cut(e.message))


def keyword_caller(fn: Callable, offered: Sequence[str], what: str) -> Callable[[Mapping[str, Any]], Any]:
    """A caller of `fn` with the values it names, by parameter name, among `offered`
    (any subset, in any order; `**kwargs` receives them all). A parameter Tandem does
    not offer and that has no default is refused now, not at the first call."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise SdkError(f"{what}: cannot read its parameters ({e}); pass a Python function") from e
    names: list[str] = []
    takes_all = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_all = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.name in offered and p.kind is not p.POSITIONAL_ONLY:
            names.append(p.name)
        elif p.default is p.empty:
            raise SdkError(
                f"{what}: parameter {p.name!r} is not one Tandem passes; name the parameters "
                f"among {', '.join(offered)} (any of them, in any order)"
            )
    if takes_all:
        names = list(offered)

    def call(values: Mapping[str, Any]) -> Any:
        return fn(**{n: values[n] for n in names})

    return call


def finite(value: Any, what: str) -> float:
    """`value` as a finite float, or `UserCodeFailed` saying what it was."""
    if value is None or isinstance(value, (str, bytes)):
        raise UserCodeFailed(f"{what} returned {value!r}: a reward must be a finite number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserCodeFailed(
            f"{what} returned a {type(value).__name__}: a reward must be a finite number"
        ) from None
    if x != x or x in (float("inf"), float("-inf")):
        raise UserCodeFailed(f"{what} returned {x}: a reward must be finite")
    return x


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(
    tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str]
) -> Optional[grpc.ServerCredentials]:
    if tls_cert is None and tls_key is None:
        if tls_ca is not None:
            raise SdkError("tls_ca needs tls_cert and tls_key (the server's certificate)")
        return None
    if tls_cert is None or tls_key is None:
        raise SdkError("TLS needs both tls_cert and tls_key (PEM files)")

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SdkError(f"{what} {path}: {e}") from e

    ca = read(tls_ca, "tls_ca") if tls_ca is not None else None
    return grpc.ssl_server_credentials(
        [(read(tls_key, "tls_key"), read(tls_cert, "tls_cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Server:
    """A running service. `address` is where it listens (`host:port`, the port chosen
    when 0 was asked); `stop()` ends it, `wait()` blocks until it has stopped. Usable as
    a context manager (stopped on exit)."""

    def __init__(self, server: grpc.Server, host: str, port: int, kind: str) -> None:
        self._server = server
        self.host = host
        self.port = port
        self.kind = kind
        self.address = _address(host, port)

    def stop(self, grace: Optional[float] = DEFAULT_GRACE_S) -> None:
        """Refuses new calls and lets those in flight finish for `grace` seconds."""
        self._server.stop(grace).wait()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server stops (or `timeout`); True when it has stopped."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)

    def __repr__(self) -> str:
        return f"<tandem_sdk {self.kind} service on {self.address}>"


def start(
    kind: str,
    register: Callable[[grpc.Server], None],
    *,
    token: str,
    host: str,
    port: int,
    max_workers: int,
    max_message_bytes: int,
    tls_cert: Optional[str],
    tls_key: Optional[str],
    tls_ca: Optional[str],
) -> Server:
    """A started gRPC server with the token check, serving what `register` adds."""
    if max_workers < 1:
        raise SdkError(f"max_workers must be ≥ 1, got {max_workers}")
    if not 0 <= port <= 65535:
        raise SdkError(f"port must be in 0..65535 (0 = any free port), got {port}")
    creds = _credentials(tls_cert, tls_key, tls_ca)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A port already in use is an error, not a second server sharing it.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"tandem-sdk-{kind}"),
        interceptors=[_TokenCheck(token)],
        options=options,
        # Calls beyond these wait in no queue: they are refused (RESOURCE_EXHAUSTED).
        maximum_concurrent_rpcs=4 * max_workers,
    )
    register(server)
    want = _address(host, port)
    try:
        bound = server.add_secure_port(want, creds) if creds else server.add_insecure_port(want)
    except RuntimeError as e:
        raise SdkError(f"cannot listen on {want}: {e} (is the port in use?)") from e
    if bound == 0:
        raise SdkError(f"cannot listen on {want} (is the port in use?)")
    server.start()
    if host not in ("127.0.0.1", "localhost", "::1") and creds is None:
        log.warning(
            "%s service listens on %s without TLS: the token and the data cross the network "
            "in the clear (pass tls_cert / tls_key)",
            kind,
            want,
        )
    return Server(server, host, bound, kind)


def serve_forever(server: Server, grace: float = DEFAULT_GRACE_S, out: Any = None) -> None:
    """Prints `listening on ADDRESS` (one line, flushed: a supervisor can read the port),
    then serves until SIGINT or SIGTERM, when calls in flight get `grace` seconds."""
    _default_logging()
    out = out or sys.stdout
    print(f"listening on {server.address}", file=out, flush=True)
    if threading.current_thread() is not threading.main_thread():
        server.wait()
        return
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("%s: stopping, calls in flight have %.0f s", signal.Signals(signum).name, grace)
        threading.Thread(target=server.stop, args=(grace,), daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("%s service stopped", server.kind)


def _default_logging() -> None:
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tandem_sdk %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def names(values: Iterable[str]) -> str:
    return ", ".join(values)
