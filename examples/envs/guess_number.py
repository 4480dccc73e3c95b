#!/usr/bin/env python3
"""A Tandem Environment service in Python: a number-guessing game, on the SDK.

Each episode hides a number from 0 to 99 (the dataset answer when it is a number in
that range, else one drawn from the episode id). Every model turn is a guess: the
first integer in the text. The environment answers "higher", "lower" or "correct";
a correct guess scores 1 and ends the episode, every other turn scores 0. A turn
without a number is told to give one.

    pip install ./python          # tandem_sdk, from the repository root
    TANDEM_ENV_TOKEN=... python3 examples/envs/guess_number.py --port 50070

(or `python -m tandem_sdk.serve_environment examples/envs/guess_number.py:GuessNumber
--port 50070`), then in the run's config:

    [env]
    service = "127.0.0.1:50070"
    max_turns = 6

The SDK checks the token of every call, listens on 127.0.0.1, keeps one GuessNumber
per episode (Reset makes it, Step plays it) and stops on Ctrl-C.
"""

import hashlib
import re

from tandem_sdk import Environment, StepResult


def secret_of(episode_id: str, answer: str) -> int:
    """The hidden number: the answer when it is a number below 100, else a hash of the episode."""
    answer = answer.strip()
    if answer.isdigit() and int(answer) < 100:
        return int(answer)
    return int(hashlib.sha256(episode_id.encode()).hexdigest(), 16) % 100


class GuessNumber(Environment):
    """One episode of the game."""

    def reset(self, episode_id: str, answer: str) -> str:
        self.secret = secret_of(episode_id, answer)
        return "Guess my number, from 0 to 99. Answer with one number."

    def step(self, action: str) -> StepResult:
        m = re.search(r"-?\d+", action)
        if m is None:
            return StepResult("Say a number from 0 to 99.")
        guess = int(m.group())
        if guess == self.secret:
            return StepResult("correct", reward=1.0, done=True)
        hint = "higher" if guess < self.secret else "lower"
        return StepResult(f"{guess} is wrong: {hint}.")


if __name__ == "__main__":
    from tandem_sdk.serve_environment import main

    main(target=GuessNumber)
