"""`python -m tandem_sdk.serve_reward MODULE:FUNCTION [--port P] [--batched] …`

Serves a reward function as a `tandem.v1.Reward` service (see tandem_sdk.reward): the
token comes from $TANDEM_REWARD_TOKEN (`--token-env` names another variable), the
service listens on 127.0.0.1 unless `--host` says otherwise, prints
`listening on HOST:PORT` and stops on SIGINT / SIGTERM.

    TANDEM_REWARD_TOKEN=$(openssl rand -hex 32) \\
        python -m tandem_sdk.serve_reward my_rewards:score --port 50060
"""

from __future__ import annotations

from typing import Any

from . import _cli
from .reward import TOKEN_ENV, serve_reward


def main(argv: "list[str] | None" = None, target: Any = None) -> None:
    """The command line; with `target` (the function itself) a script serves it and takes
    no MODULE:FUNCTION argument."""
    ap = _cli.parser(__doc__.strip().splitlines()[2], None if target is not None else "MODULE:FUNCTION", TOKEN_ENV)
    ap.add_argument(
        "--batched",
        action="store_true",
        help="call the function once per group with `completions` (a list) instead of once per completion",
    )

    def go() -> None:
        args = ap.parse_args(argv)
        options = _cli.service_options(args)
        serve_reward(target if target is not None else _cli.load(args.target), batched=args.batched, **options)

    _cli.run(go)


if __name__ == "__main__":
    main()
