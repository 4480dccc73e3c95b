#!/usr/bin/env bash
# Builds `tandem` with candle's CUDA backend on a machine without a GPU or a CUDA
# install (Debian 12 x86_64 with pip), and copies it to gpu/bin/tandem (+ .xz) so that
# it can travel to a GPU machine. ARCHITECTURE.md ("Building for CUDA without a GPU")
# gives the facts behind each step.
#
#   scripts/build-cuda.sh            # --features cuda
#   scripts/build-cuda.sh --nccl     # --features nccl (cuda + NCCL weight broadcast)
#   eval "$(scripts/build-cuda.sh --print-env)"   # set up, then only print the exports
#                                    # (for cargo check/clippy/test --features cuda by hand)
#
# Environment:
#   TANDEM_CUDA_TOOLCHAIN  toolchain cache (default ~/.cache/tandem/cuda-toolchain);
#                          reused when present, so only the first run downloads.
#   CARGO_TARGET_DIR       default <repo>/target/cuda (kept apart from the CPU build).
#   CUDA_COMPUTE_CAP       default 90 (sm_90a: H100, H200).
#
# The toolchain: nvcc 13.0 and the CUDA 13 libraries from PyPI wheels (the versions
# PyTorch 2.11+cu130 pins, which is what the GPU machine loads at run time), plus a
# link-time stub of libcuda generated from cudarc's driver bindings. Nothing is
# installed system-wide.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FEATURES=cuda
PRINT_ENV=0
for arg in "$@"; do
    case "$arg" in
        --nccl) FEATURES=nccl ;;
        --print-env) PRINT_ENV=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "build-cuda.sh: unknown argument '$arg' (expected --nccl or --print-env)" >&2; exit 2 ;;
    esac
done

say() { echo "[build-cuda] $*" >&2; }
die() { echo "[build-cuda] error: $*" >&2; exit 1; }

CACHE="${TANDEM_CUDA_TOOLCHAIN:-$HOME/.cache/tandem/cuda-toolchain}"
WHEELS="$CACHE/wheels"
ROOT="$CACHE/root"          # the unzipped wheels: nvidia/cu13/{bin,include,lib,nvvm}, nvidia/nccl
CUDA_HOME_DIR="$CACHE/cuda" # CUDA_HOME: bin, include, lib/ of unversioned links, lib/stubs/libcuda.so
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"

# Pinned: nvcc 13.0.x emits PTX ≤ 9.0, which driver 580 (CUDA 13.0) can JIT; nvidia-nvvm
# is pinned because nvcc's own requirement is unpinned (and resolves to 13.5).
TOOL_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
             nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)
# Link-time libraries, the versions torch 2.11 pins (its venv supplies them at run time).
LIB_WHEELS=(nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
            nvidia-nccl-cu13==2.28.9)

for tool in python3 cc unzip cargo; do
    command -v "$tool" >/dev/null || die "'$tool' is not on PATH"
done

# 1. Wheels (downloaded once; a finished download leaves a stamp).
mkdir -p "$WHEELS"
want="${TOOL_WHEELS[*]} ${LIB_WHEELS[*]}"
if [[ "$(cat "$WHEELS/.done" 2>/dev/null)" != "$want" ]]; then
    say "downloading CUDA wheels into $WHEELS (about 1 GB, once)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "${TOOL_WHEELS[@]}" "${LIB_WHEELS[@]}" \
        || die "pip download failed (network? the pinned versions are in this script)"
    echo "$want" > "$WHEELS/.done"
    rm -f "$ROOT/.done"
else
    say "wheels present in $WHEELS"
fi

# 2. Unzip them into one tree.
if [[ "$(cat "$ROOT/.done" 2>/dev/null)" != "$want" ]]; then
    say "unpacking wheels into $ROOT"
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    for w in "$WHEELS"/*.whl; do
        unzip -q -o "$w" -d "$ROOT"
    done
    chmod +x "$ROOT"/nvidia/cu13/bin/* "$ROOT"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
    echo "$want" > "$ROOT/.done"
fi
CU="$ROOT/nvidia/cu13"
[[ -x "$CU/bin/nvcc" ]] || die "no nvcc in $CU/bin after unpacking (wheel layout changed?)"
NCCL_LIB="$(dirname "$(find "$ROOT/nvidia" -name 'libnccl.so*' | head -n1)")"
[[ -d "$NCCL_LIB" ]] || die "no libnccl in the unpacked wheels"

# 3. CUDA_HOME: bin and include point into the wheels; lib holds unversioned links
#    (the wheels ship only libfoo.so.N) and the libcuda stub.
mkdir -p "$CUDA_HOME_DIR/lib/stubs"
ln -sfn "$CU/bin" "$CUDA_HOME_DIR/bin"
ln -sfn "$CU/include" "$CUDA_HOME_DIR/include"
ln -sfn "$CU/nvvm" "$CUDA_HOME_DIR/nvvm"
for so in "$CU"/lib/lib*.so.* "$NCCL_LIB"/lib*.so.*; do
    [[ -e "$so" ]] || continue
    base="$(basename "$so")"
    ln -sfn "$so" "$CUDA_HOME_DIR/lib/$base"
    ln -sfn "$so" "$CUDA_HOME_DIR/lib/${base%%.so.*}.so"
done
for need in cudart cublas cublasLt curand nvrtc nccl; do
    [[ -e "$CUDA_HOME_DIR/lib/lib$need.so" ]] || die "lib$need.so missing from the wheels"
done

# 4. The libcuda stub: every cu* function of cudarc's driver bindings (the version in
#    Cargo.lock) returning CUDA_ERROR_UNKNOWN (999), SONAME libcuda.so.1. Only the
#    linker sees it; at run time the driver's libcuda.so.1 is loaded.
CUDARC_VER="$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$REPO/Cargo.lock")"
[[ -n "$CUDARC_VER" ]] || die "cudarc is not in Cargo.lock (is the 'cuda' feature in Cargo.toml?)"
STUB="$CUDA_HOME_DIR/lib/stubs/libcuda.so"
if [[ "$(cat "$STUB.version" 2>/dev/null)" != "$CUDARC_VER" ]]; then
    BINDINGS="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VER"/src/driver/sys/mod.rs 2>/dev/null | head -n1 || true)"
    if [[ -z "$BINDINGS" ]]; then
        say "fetching crates (cudarc $CUDARC_VER sources)"
        (cd "$REPO" && cargo fetch)
        BINDINGS="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VER"/src/driver/sys/mod.rs | head -n1)"
    fi
    say "building the libcuda stub from $BINDINGS"
    stub_c="$CUDA_HOME_DIR/lib/stubs/libcuda_stub.c"
    {
        echo "/* Generated by scripts/build-cuda.sh from cudarc $CUDARC_VER: link-time stub only. */"
        grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$BINDINGS" | awk '{print $4}' | sort -u |
            while read -r f; do echo "int $f(void) { return 999; }"; done
    } > "$stub_c"
    n="$(grep -c '^int ' "$stub_c")"
    (( n > 100 )) || die "only $n driver functions found in $BINDINGS"
    cc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$STUB" "$stub_c"
    echo "$CUDARC_VER" > "$STUB.version"
    say "libcuda stub: $n functions"
fi

# 5. Build.
export PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDA_HOME="$CUDA_HOME_DIR"
export LIBRARY_PATH="$CUDA_HOME_DIR/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# nccl.h for cudarc's version probe, if it looks.
NCCL_HOME="$(dirname "$NCCL_LIB")"
export NCCL_HOME
if (( PRINT_ENV )); then
    for v in PATH CUDA_COMPUTE_CAP CUDA_HOME LIBRARY_PATH NCCL_HOME CARGO_TARGET_DIR; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    exit 0
fi
say "nvcc: $(nvcc --version | tail -n1)"
say "cargo build --release --features $FEATURES (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; the first build compiles candle's CUDA kernels: 10-20 min)"
start=$(date +%s)
(cd "$REPO" && cargo build --release --features "$FEATURES" --bin tandem)
say "built in $(( $(date +%s) - start )) s"

# 6. Copy (stripped) to gpu/bin, with an .xz beside it for tight transfers.
mkdir -p "$REPO/gpu/bin"
cp "$CARGO_TARGET_DIR/release/tandem" "$REPO/gpu/bin/tandem.tmp"
strip "$REPO/gpu/bin/tandem.tmp" 2>/dev/null || say "strip not found: binary left with line tables"
mv "$REPO/gpu/bin/tandem.tmp" "$REPO/gpu/bin/tandem"
echo "$FEATURES" > "$REPO/gpu/bin/FEATURES"
xz -T0 -6 -c "$REPO/gpu/bin/tandem" > "$REPO/gpu/bin/tandem.xz.tmp" && mv "$REPO/gpu/bin/tandem.xz.tmp" "$REPO/gpu/bin/tandem.xz"
say "gpu/bin/tandem: $(du -h "$REPO/gpu/bin/tandem" | cut -f1) (xz: $(du -h "$REPO/gpu/bin/tandem.xz" | cut -f1)), features: $FEATURES"
say "needs at run time: $(readelf -d "$REPO/gpu/bin/tandem" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); printf "%s ", $5}')"
