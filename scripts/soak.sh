#!/usr/bin/env bash
# Soak: `tandem run` of the tiny model for DURATION seconds (default 1800), sampling
# the resident memory (VmRSS) of every process of the run every 30 s, then a summary:
# per process, the median RSS of the first and the last fifth of the samples after
# the first 2 minutes (warm-up) and their ratio. Not part of CI.
#
#   scripts/soak.sh [DURATION_S] [OUT_DIR]     # writes OUT_DIR/rss.csv, OUT_DIR/summary.txt
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-1800}
out=${2:-runs/soak}
bin=${TANDEM_BIN:-target/release/tandem}
[ -x "$bin" ] || { echo "build first: cargo build --release (or set TANDEM_BIN)" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
cat > "$out/soak.toml" <<TOML
[run]
steps = 1000000
batch_groups = 2
group_size = 4
max_staleness = 1
generators = 2
run_dir = "$out/run"

[model]
path = "preset:tiny"

[data]
kind = "arithmetic"
chat = false
template = "{question} ="

[generator]
max_new_tokens = 16

[reward]
math = 1.0
format = 0.5
format_kind = "digits"

[optimizer]
lr = 1e-3

[trainer]
checkpoint_every = 50
keep_checkpoints = 2
TOML
"$bin" run "$out/soak.toml" > "$out/run.log" 2>&1 &
run_pid=$!
trap 'kill $run_pid 2>/dev/null || true' EXIT
echo "elapsed_s,process,rss_kib" > "$out/rss.csv"
start=$(date +%s)
while :; do
    sleep 30
    now=$(( $(date +%s) - start ))
    if [ -f "$out/run/processes.json" ]; then
        python3 - "$out/run/processes.json" "$now" >> "$out/rss.csv" <<'PY'
import json, sys
for name, pid in json.load(open(sys.argv[1])).items():
    try:
        rss = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
        print(f"{sys.argv[2]},{name},{rss}")
    except (OSError, StopIteration):
        pass
PY
    fi
    kill -0 $run_pid 2>/dev/null || { echo "the run stopped early; see $out/run.log" >&2; break; }
    [ "$now" -ge "$duration" ] && break
done
# Stop the run and every process it started.
if [ -f "$out/run/processes.json" ]; then
    for pid in $(python3 -c "import json,sys; print(' '.join(str(p) for p in json.load(open(sys.argv[1])).values()))" "$out/run/processes.json"); do
        kill "$pid" 2>/dev/null || true
    done
fi
kill $run_pid 2>/dev/null || true
python3 - "$out/rss.csv" > "$out/summary.txt" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["elapsed_s"]) > 120]
by = {}
for r in rows:
    by.setdefault(r["process"], []).append((int(r["elapsed_s"]), int(r["rss_kib"])))
print("process | samples | first fifth MiB | last fifth MiB | last / first")
for name, xs in sorted(by.items()):
    xs.sort()
    k = max(1, len(xs) // 5)
    a = statistics.median(v for _, v in xs[:k]) / 1024
    b = statistics.median(v for _, v in xs[-k:]) / 1024
    print(f"{name} | {len(xs)} | {a:.1f} | {b:.1f} | {b / a:.3f}")
PY
cat "$out/summary.txt"
