"""The command-line side shared by `python -m tandem_sdk.serve_reward` and
`python -m tandem_sdk.serve_environment`: loading `module:attribute` and the options
every service takes."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable

from . import _server


def load(spec: str) -> Any:
    """The object `spec` names: `package.module:attr` (imported from the current folder
    or the installed packages) or `path/to/file.py:attr`; `attr` may be dotted."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _server.SdkError(f"{spec!r}: expected MODULE:NAME (my_rewards:score) or FILE.py:NAME")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise _server.SdkError(f"{spec!r}: no file {path}")
        name = os.path.splitext(os.path.basename(path))[0]
        # The file's folder first, so that its own imports of its neighbours work.
        sys.path.insert(0, os.path.dirname(path))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _server.SdkError(f"{spec!r}: {module_name} has no {attr}") from None
    return obj


def parser(description: str, target: "str | None", token_env: str) -> argparse.ArgumentParser:
    """The parser of a serving command; `target` names its MODULE:NAME argument (None:
    the program serves a fixed object and takes none)."""
    ap = argparse.ArgumentParser(description=description)
    if target is not None:
        ap.add_argument("target", metavar=target, help="what to serve: MODULE:NAME or FILE.py:NAME")
    add_service_options(ap, token_env)
    return ap


def add_service_options(ap: argparse.ArgumentParser, token_env: str) -> None:
    """The options of every service."""
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port, printed)")
    ap.add_argument(
        "--host",
        default=_server.DEFAULT_HOST,
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 for every interface, with TLS)",
    )
    ap.add_argument(
        "--token-env",
        default=token_env,
        metavar="VAR",
        help="environment variable holding the token every call must carry (default %(default)s)",
    )
    ap.add_argument("--timeout-s", type=float, default=None, help="longest a call may take (default: the caller's deadline)")
    ap.add_argument("--max-workers", type=int, default=8, help="calls served at once (default %(default)s)")
    ap.add_argument("--tls-cert", default=None, help="the server's certificate (PEM): serve TLS")
    ap.add_argument("--tls-key", default=None, help="its private key (PEM)")
    ap.add_argument("--tls-ca", default=None, help="require client certificates signed by this CA (PEM)")
    ap.add_argument("--grace-s", type=float, default=_server.DEFAULT_GRACE_S, help="seconds calls in flight get on SIGINT / SIGTERM")
    ap.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def service_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `reward_server` / `environment_server` from `args`."""
    logging.basicConfig(level=args.log_level.upper(), format="tandem_sdk %(levelname)s: %(message)s")
    token = _server.resolve_token(None, args.token_env)
    return {
        "port": args.port,
        "host": args.host,
        "token": token,
        "timeout_s": args.timeout_s,
        "max_workers": args.max_workers,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_ca": args.tls_ca,
        "grace_s": args.grace_s,
    }


def run(main: Callable[[], None]) -> None:
    """Runs `main`, printing an `SdkError` as one line and exiting 2."""
    try:
        main()
    except _server.SdkError as e:
        sys.exit(f"tandem_sdk: {e}")
