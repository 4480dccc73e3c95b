#!/usr/bin/env bash
# The GPU checks, in one run of under 10 minutes on an H100, writing JSON figures into
# OUT_DIR. Runs on the GPU machine (no Rust, no internet) from the repository root,
# with the prebuilt binary from scripts/build-cuda.sh and PyTorch + transformers in
# the Python found as `python3` (or $PYTHON).
#
#   scripts/gpu-check.sh OUT_DIR         # on the GPU machine
#   scripts/gpu-check.sh --prepare       # here, before: fills gpu/models (see below)
#
# Steps (each with its own time limit; a failed step is recorded and the next runs):
#   env      GPU, driver, torch, the binary's libraries             -> env.json
#   models   tiny preset + SmolLM2-135M (real weights if copied over,
#            else random weights of its shape)                      -> models.json
#   parity   per-token logprobs/entropies: Tandem CPU f32, Tandem
#            CUDA f32/bf16, transformers CUDA f32/bf16, same tokens -> parity_<model>.json
#   bench    decode tok/s at batch 1, 8, 64 (128 new tokens) and
#            fwd+bwd tok/s at 8x512, Tandem vs transformers, bf16   -> bench.json
#   generate the sampling engine (8 prompts x 8 samples, up to 256 new
#            tokens, continuous batching, shared prefill, paged KV) beside
#            transformers generate, bf16; and without shared prefill -> generate.json
#   nccl     world-size-1 NCCL broadcast of the weights' bytes vs a
#            device-to-device copy, and through the weight broadcast's
#            own NCCL plane (binary built with --nccl)              -> nccl.json
#   run      `tandem run` of 3 GRPO steps, trainer and generator
#            sharing the GPU                                        -> run.json, run/
#   summary.json: every step's exit code and seconds, and the headline figures.
#
# What must be copied to the GPU machine (ignored paths; sized for transfers of at
# most 64 MiB at a time):
#   gpu/bin/tandem.xz (11 MiB; unpacked here with Python's lzma: the binary itself is
#     75 MiB, over the limit), gpu/bin/FEATURES
#   gpu/models/smollm2-shape (config + tokenizer of SmolLM2-135M, 1.6 MiB)
#   optional, the real weights: the Q4_1 GGUF is 94 MiB, too big for one call, so
#     --prepare splits it into gpu/models/smollm2/*.part-aa (48 MiB) and -ab (46 MiB);
#     copy part-aa over first and run `scripts/gpu-check.sh --stash`, then copy
#     part-ab and run the checks. Parts are joined from gpu/models/smollm2/ and
#     $TANDEM_GPU_STASH (/tmp/tandem-stash), and used only when the sha256 matches;
#     otherwise SmolLM2 gets random weights of its shape (speed figures are the same).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
STASH="${TANDEM_GPU_STASH:-/tmp/tandem-stash}"
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOLLM2_GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

# ---------------------------------------------------------------- --prepare (CPU machine)
if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    TANDEM_CPU="${TANDEM_CPU:-$REPO/target/release/tandem}"
    [[ -x "$TANDEM_CPU" ]] || { echo "need a CPU build at $TANDEM_CPU (cargo build --release) or TANDEM_CPU=..." >&2; exit 1; }
    gguf="$("$TANDEM_CPU" model fetch smollm2 2>/dev/null | tail -n1)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    TANDEM_DEVICE=cpu "$TANDEM_CPU" model convert --input "$gguf" --out "$tmp/hf" >/dev/null
    mkdir -p gpu/models/smollm2-shape gpu/models/smollm2
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do
        cp "$tmp/hf/$f" gpu/models/smollm2-shape/
    done
    rm -f gpu/models/smollm2/*.part-*
    split -b 48M "$gguf" "gpu/models/smollm2/$SMOLLM2_GGUF_NAME.part-"
    du -sh gpu/models/smollm2-shape gpu/models/smollm2/* gpu/bin/* 2>/dev/null
    exit 0
fi
# ------------------------------------------------- --stash (GPU machine, first of two calls)
if [[ "${1:-}" == "--stash" ]]; then
    mkdir -p "$STASH" && cp -v gpu/models/smollm2/*.part-* "$STASH"/
    exit $?
fi

[[ $# -eq 1 ]] || { echo "usage: scripts/gpu-check.sh OUT_DIR | --prepare | --stash" >&2; exit 2; }
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
WORK="${TMPDIR:-/tmp}/tandem-gpu-check"
rm -rf "$WORK"
mkdir -p "$WORK"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-450}" # seconds for everything; steps are cut to what is left
SUMMARY="$OUT/steps.jsonl"
: > "$SUMMARY"

say() { echo "[gpu-check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu-check.log" >&2; }

# step NAME LIMIT_SECONDS FUNCTION: runs FUNCTION under `timeout` (capped by the budget
# left), its output in OUT/NAME.log; records the exit code and seconds.
step() {
    local name="$1" limit=$(( $2 * ${GPU_CHECK_STEP_SCALE:-1} )) fn="$3"
    local left=$(( START + BUDGET - $(date +%s) ))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then
        say "$name: skipped, no time left"
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"no time left\"}" >> "$SUMMARY"
        return
    fi
    say "$name: start (limit ${limit}s)"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$fn" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    say "$name: rc=$rc in ${dt}s$([[ $rc == 124 ]] && echo ' (timed out)')"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt}" >> "$SUMMARY"
}

# ------------------------------------------------------------------ environment
SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cublas/lib:${LD_LIBRARY_PATH:-}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
export TANDEM_LOG="${TANDEM_LOG:-info}"
BIN="${TANDEM_BIN:-$REPO/gpu/bin/tandem}"
if [[ ! -x "$BIN" && -f "$BIN.xz" ]]; then
    "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$BIN.xz" "$WORK/tandem"
    chmod +x "$WORK/tandem"
    BIN="$WORK/tandem"
fi
# Knobs for a dry run of the script on a CPU machine (GPU_CHECK_DEVICE=cpu, smaller sizes,
# GPU_CHECK_STEP_SCALE multiplies every step's time limit, GPU_CHECK_BUDGET the total).
DEV="${GPU_CHECK_DEVICE:-cuda}"
DECODE_BATCHES="${GPU_CHECK_DECODE_BATCHES:-1,8,64}"
NEW_TOKENS="${GPU_CHECK_NEW_TOKENS:-128}"
TRAIN_BATCH="${GPU_CHECK_TRAIN_BATCH:-8}"
TRAIN_LEN="${GPU_CHECK_TRAIN_LEN:-512}"
REPS="${GPU_CHECK_REPS:-3}"
export BIN PY OUT WORK REPO STASH SMOLLM2_SHA256 SMOLLM2_GGUF_NAME DEV DECODE_BATCHES NEW_TOKENS \
    TRAIN_BATCH TRAIN_LEN REPS
REF="$REPO/tools/gpu_reference.py"
export REF

env_step() {
    set -x
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    ldd "$BIN" | grep -E "not found|cuda|nccl|cublas|curand|cudart" || true
    "$BIN" --version
    "$PY" - "$OUT/env.json" "$BIN" "$REPO/gpu/bin/FEATURES" <<'EOF'
import json, os, subprocess, sys, torch, transformers
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError as e:
        return f"{cmd[0]}: {e}"
smi = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
ldd = run("ldd", sys.argv[2])
json.dump({"nvidia_smi": smi, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
           "missing_libraries": [l.split()[0] for l in ldd.splitlines() if "not found" in l],
           "features": open(sys.argv[3]).read().strip() if os.path.exists(sys.argv[3]) else None,
           "binary": sys.argv[2]}, open(sys.argv[1], "w"), indent=2)
EOF
    cat "$OUT/env.json"
}

models_step() {
    set -ex
    TANDEM_DEVICE=cpu "$BIN" model init --preset tiny --out "$WORK/models/tiny"
    src="random init, SmolLM2-135M shape (seed 0)"
    gguf=$(ls "$REPO"/gpu/models/smollm2/*.gguf 2>/dev/null | head -n1 || true)
    # Parts of the GGUF, joined in suffix order from whichever folder holds each.
    names=$(for f in "$REPO"/gpu/models/smollm2/*.part-* "$STASH"/*.part-*; do
                [[ -f "$f" ]] && basename "$f"; done | sort -u)
    if [[ -z "$gguf" && -n "$names" ]]; then
        gguf="$WORK/$SMOLLM2_GGUF_NAME"
        : > "$gguf"
        for n in $names; do
            if [[ -f "$REPO/gpu/models/smollm2/$n" ]]; then cat "$REPO/gpu/models/smollm2/$n"; else cat "$STASH/$n"; fi >> "$gguf"
        done
    fi
    if [[ -n "$gguf" && "$(sha256sum "$gguf" | cut -d' ' -f1)" == "$SMOLLM2_SHA256" ]]; then
        TANDEM_DEVICE=cpu "$BIN" model convert --input "$gguf" --out "$WORK/models/smollm2"
        src="SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to f32"
    else
        if [[ -n "$gguf" ]]; then echo "SmolLM2 GGUF incomplete or corrupt (sha256 mismatch): random weights instead"; fi
        "$PY" "$REF" init --shape "$REPO/gpu/models/smollm2-shape" --out "$WORK/models/smollm2" --seed 0
    fi
    echo "{\"tiny\": \"preset tiny (seed 0)\", \"smollm2\": \"$src\"}" > "$OUT/models.json"
    cat "$OUT/models.json"
}

parity_one() { # NAME: Tandem and transformers logprobs of the same records
    local name="$1" m="$WORK/models/$1" d="$WORK/parity/$1"
    mkdir -p "$d"
    "$PY" "$REF" inputs --model "$m" --out "$d/in.jsonl"
    score() { TANDEM_DEVICE="$1" TANDEM_DTYPE="$2" "$BIN" score --model "$m" --input "$d/in.jsonl" --output "$d/tandem_$3.jsonl"; }
    score cpu f32 cpu_f32 || true
    score "$DEV" f32 cuda_f32 || true
    score "$DEV" bf16 cuda_bf16 || true
    "$PY" "$REF" logprobs --model "$m" --input "$d/in.jsonl" --output "$d/hf_cuda_{dtype}.jsonl" \
        --device "$DEV" --dtype f32,bf16 || true
    "$PY" - "$d" "$OUT/parity_$name.json" "$REF" <<'EOF'
import json, subprocess, sys
d, out, ref = sys.argv[1:4]
def cmp(reference, *names):
    p = subprocess.run([sys.executable, ref, "compare", "--reference", f"{d}/{reference}.jsonl"]
                       + [f"{n}={d}/{n}.jsonl" for n in names], capture_output=True, text=True)
    return json.loads(p.stdout)["against"] if p.returncode == 0 else {"error": p.stderr[-500:]}
json.dump({
    "vs_transformers_cuda_f32": cmp("hf_cuda_f32", "tandem_cuda_f32", "tandem_cpu_f32"),
    "vs_transformers_cuda_bf16": cmp("hf_cuda_bf16", "tandem_cuda_bf16"),
    "vs_tandem_cpu_f32": cmp("tandem_cpu_f32", "tandem_cuda_f32", "tandem_cuda_bf16", "hf_cuda_bf16"),
}, open(out, "w"), indent=2)
EOF
    cat "$OUT/parity_$name.json"
}
parity_step() { set -x; parity_one tiny; parity_one smollm2; }

bench_step() {
    set -x
    local m="$WORK/models/smollm2"
    TANDEM_DEVICE="$DEV" TANDEM_DTYPE=bf16 "$BIN" bench model --model "$m" \
        --decode-batches "$DECODE_BATCHES" --new-tokens "$NEW_TOKENS" --train-batch "$TRAIN_BATCH" \
        --train-len "$TRAIN_LEN" --reps "$REPS" --threads 8 --json "$WORK/bench_tandem.json" || true
    "$PY" "$REF" bench --model "$m" --device "$DEV" --dtype bf16 --decode-batches "$DECODE_BATCHES" \
        --new-tokens "$NEW_TOKENS" --train-batch "$TRAIN_BATCH" --train-len "$TRAIN_LEN" --reps "$REPS" \
        --json "$WORK/bench_hf.json" || true
    "$PY" - "$WORK/bench_tandem.json" "$WORK/bench_hf.json" "$OUT/bench.json" <<'EOF'
import json, sys
def read(p):
    try: return json.load(open(p))
    except Exception as e: return {"error": str(e)}
t, h = read(sys.argv[1]), read(sys.argv[2])
tp, hp = t.get("tandem", {}).get("phases", {}), h.get("phases", {})
rows = {}
for ph in sorted(set(tp) | set(hp)):
    a, b = tp.get(ph, {}), hp.get(ph, {})
    rows[ph] = {"tandem_tokens_per_s": a.get("tokens_per_s"), "transformers_tokens_per_s": b.get("tokens_per_s"),
                "tandem_seconds": a.get("seconds"), "transformers_seconds": b.get("seconds")}
    if a.get("seconds") and b.get("seconds"):
        rows[ph]["tandem_speedup"] = b["seconds"] / a["seconds"]
json.dump({"dtype": "bf16", "phases": rows, "tandem": t, "transformers": h}, open(sys.argv[3], "w"), indent=2)
EOF
    cat "$OUT/bench.json" | head -60
}

generate_step() {
    set -x
    TANDEM_DEVICE="$DEV" TANDEM_DTYPE=bf16 "$BIN" bench generate --model "$WORK/models/smollm2" \
        --reference "$REPO/tools/bench_generate.py" --python "$PY" --threads 8 \
        --concurrency "" --ablations no_shared_prefill --json "$OUT/generate.json"
}

nccl_step() {
    set -x
    if ! "$BIN" bench nccl --help >/dev/null 2>&1; then
        echo '{"skipped": "binary built without the nccl feature (scripts/build-cuda.sh --nccl)"}' > "$OUT/nccl.json"
        return 0
    fi
    TANDEM_DEVICE="$DEV" TANDEM_DTYPE=bf16 NCCL_DEBUG=WARN "$BIN" bench nccl --model "$WORK/models/smollm2" --json "$OUT/nccl.json"
}

run_step() {
    set -x
    TANDEM_DEVICE="$DEV" "$BIN" run "$REPO/examples/smollm2-grpo.toml" --fresh --set run.steps=3 \
        --set run.generators=1 --set "run.run_dir=$WORK/run" --set "model.path=$WORK/models/smollm2"
    local rc=$?
    mkdir -p "$OUT/run"
    cp -r "$WORK/run/logs" "$OUT/run/" 2>/dev/null
    cp "$WORK"/run/*.json "$WORK"/run/*.jsonl "$OUT/run/" 2>/dev/null
    "$PY" - "$WORK/run" "$OUT/run.json" "$rc" <<'EOF'
import glob, json, os, sys
d, out, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = {"rc": rc}
for f in ("trainer-summary.json", "coordinator-status.json"):
    p = os.path.join(d, f)
    if os.path.exists(p):
        res[f.split(".")[0]] = json.load(open(p))
m = glob.glob(os.path.join(d, "**", "metrics.jsonl"), recursive=True)
if m:
    res["metrics"] = [json.loads(l) for l in open(m[0]) if l.strip()]
json.dump(res, open(out, "w"), indent=2)
EOF
    return $rc
}

export -f say env_step models_step parity_one parity_step bench_step generate_step nccl_step run_step
export START
step env 60 env_step
step models 120 models_step
step parity 150 parity_step
step bench 240 bench_step
step generate 120 generate_step
step nccl 60 nccl_step
step run 150 run_step

"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys
out, secs = sys.argv[1], int(sys.argv[2])
def read(name):
    try: return json.load(open(os.path.join(out, name)))
    except Exception: return None
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
s = {"seconds": secs, "steps": steps, "models": read("models.json"), "env": read("env.json")}
for name in ("tiny", "smollm2"):
    p = read(f"parity_{name}.json")
    if p:
        s[f"parity_{name}"] = {k: {n: {m: v for m, v in r.items() if m.endswith("max_abs_diff")}
                                   for n, r in g.items() if isinstance(r, dict)}
                               for k, g in p.items() if isinstance(g, dict)}
b = read("bench.json")
if b: s["bench_bf16"] = b.get("phases")
g = read("generate.json")
if g: s["generate_bf16"] = {"tandem_tok_per_s": g.get("tandem", {}).get("tok_per_s"),
                            "transformers_tok_per_s": (g.get("reference") or {}).get("tok_per_s")}
s["nccl"] = read("nccl.json")
r = read("run.json")
if r: s["run"] = {"rc": r.get("rc"), "steps_logged": len(r.get("metrics", []))}
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(s, indent=2))
EOF
say "done in $(( $(date +%s) - START ))s; figures in $OUT"
