#!/usr/bin/env bash
# A Python venv at DIR with the pinned packages of REQUIREMENTS, made once and kept
# while REQUIREMENTS is unchanged (DIR/requirements.txt is the copy it was made from);
# made again when it changes. Uses python3 (or $PYTHON). Where `python3 -m venv` cannot
# run (Debian's python3 without python3-venv) and this is root with apt, installs
# python3-venv first.
#   scripts/python-venv.sh DIR REQUIREMENTS
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: scripts/python-venv.sh DIR REQUIREMENTS" >&2
    exit 2
fi
dir=$1
req=$2
py=${PYTHON:-python3}
if [ -x "$dir/bin/python" ] && cmp -s "$req" "$dir/requirements.txt"; then
    exit 0
fi
rm -rf "$dir"
if ! "$py" -m venv "$dir" >/dev/null 2>&1; then
    rm -rf "$dir"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        timeout 300 apt-get install -y --no-install-recommends python3-venv >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && timeout 300 apt-get install -y --no-install-recommends python3-venv >/dev/null 2>&1; } \
            || true
    fi
    if ! "$py" -m venv "$dir"; then
        rm -rf "$dir"
        echo "python-venv: \`$py -m venv\` failed (Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
if ! timeout 600 "$dir/bin/pip" install -q --disable-pip-version-check -r "$req"; then
    rm -rf "$dir"
    echo "python-venv: the packages of $req did not install into $dir" >&2
    exit 1
fi
cp "$req" "$dir/requirements.txt"
