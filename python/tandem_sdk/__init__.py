"""tandem_sdk: your reward function or environment, served to Tandem in a few lines.

    from tandem_sdk import serve_reward

    def score(prompt, completion, answer, info):
        return 1.0 if completion.strip() == answer else 0.0

    serve_reward(score, port=50060)     # [reward] service = "127.0.0.1:50060"

- `serve_reward(fn, …)` / `reward_server(fn, …)`: a `tandem.v1.Reward` service
  (tandem_sdk.reward).
- `serve_environment(Class, …)` / `environment_server(Class, …)`: a
  `tandem.v1.Environment` service, one object per episode (tandem_sdk.environment).
- `python -m tandem_sdk.serve_reward module:function --port P` and
  `python -m tandem_sdk.serve_environment module:Class --port P`: the same from a shell.
- `python -m tandem_sdk.reasoning_gym export | serve`: reasoning-gym's tasks as a
  dataset and their scorers as a reward service (extra `reasoning-gym`).

Every service checks the token of each call (`authorization: Bearer <token>`, as
Tandem's generators send it), listens on loopback unless told otherwise, turns a
failing or non-finite result into a gRPC error with its message, and stops cleanly on
SIGINT / SIGTERM. The `serve_*` functions block; the `*_server` ones return the
running `Server` (`.address`, `.stop()`).
"""

from ._server import Server, SdkError
from .environment import Environment, StepResult, environment_server, serve_environment
from .info import read_info
from .reward import reward_server, serve_reward

__version__ = "0.1.0"

__all__ = [
    "Environment",
    "SdkError",
    "Server",
    "StepResult",
    "environment_server",
    "read_info",
    "reward_server",
    "serve_environment",
    "serve_reward",
]
