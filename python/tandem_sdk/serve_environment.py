"""`python -m tandem_sdk.serve_environment MODULE:CLASS [--port P] …`

Serves an environment class (one object per episode, see tandem_sdk.environment) as a
`tandem.v1.Environment` service: the token comes from $TANDEM_ENV_TOKEN (`--token-env`
names another variable), the service listens on 127.0.0.1 unless `--host` says
otherwise, prints `listening on HOST:PORT` and stops on SIGINT / SIGTERM.

    TANDEM_ENV_TOKEN=$(openssl rand -hex 32) \\
        python -m tandem_sdk.serve_environment examples/envs/guess_number.py:GuessNumber --port 50070
"""

from __future__ import annotations

from typing import Any

from . import _cli
from .environment import TOKEN_ENV, serve_environment


def main(argv: "list[str] | None" = None, target: Any = None) -> None:
    """The command line; with `target` (the class itself) a script serves it and takes
    no MODULE:CLASS argument."""
    ap = _cli.parser(__doc__.strip().splitlines()[2], None if target is not None else "MODULE:CLASS", TOKEN_ENV)
    ap.add_argument(
        "--episode-timeout-s",
        type=float,
        default=3600.0,
        help="forget an episode after this many seconds without a call (default %(default)s)",
    )

    def go() -> None:
        args = ap.parse_args(argv)
        options = _cli.service_options(args)
        serve_environment(target if target is not None else _cli.load(args.target), episode_timeout_s=args.episode_timeout_s, **options)

    _cli.run(go)


if __name__ == "__main__":
    main()
