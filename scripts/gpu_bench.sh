#!/usr/bin/env bash
# The full-size benchmark on one NVIDIA GPU (H100/H200 class), offline, in under 8 minutes.
#
# It builds the real VIBE architecture (Qwen3-VL-2B + 1.6B VIBE DiT + DC-AE f32c32) with random weights (no
# download) and times edits at 1024² and 2048²: 3-way CFG and distilled (1 branch), eager and torch.compile, each
# also with CUDA graphs, and the offload modes; and round 2's paths (issue 17): the fused Triton kernels
# (--kernels triton), FP8 linears (--quantize fp8), both, each also compiled, a second compiled process on the warm
# compile cache (what a `--compile auto` rule would be decided from), and scripts/speed_quality.py's latent error
# and PSNR of each new path against plain bf16. Each configuration runs in its own process (clean memory peaks) through
# `python3 -m compactedit_cli bench`, with no user config (COMPACTEDIT_HOME is an empty folder). Results: one JSON
# report per configuration plus gpu_bench.log, in OUT_DIR (default: $OUT if set, else ./bench-results).
#
#   1. Where PyPI is reachable, fetch the wheels the GPU image may lack (transformers 5.24, diffusers 0.42 and the
#      versions they check at import; the CLI's Typer and Rich and what they import; psutil, platformdirs) into
#      .whl/ (git-ignored):                                          bash scripts/gpu_bench.sh --fetch-wheels
#   2. On the GPU machine, from the repo root with .whl/ beside it:  bash scripts/gpu_bench.sh [OUT_DIR]
#
# Knobs for a CPU dry run of the whole script (e.g. BENCH_DEVICE=cpu BENCH_WEIGHTS=tiny BENCH_RESOLUTIONS=64
# BENCH_STEPS=2 BENCH_NO_WHEELS=1): BENCH_DEVICE (cuda), BENCH_WEIGHTS (full), BENCH_RESOLUTIONS ("1024 2048"),
# BENCH_STEPS (20), BENCH_BUDGET_S (seconds for the whole script, 470), BENCH_NO_WHEELS (1: ignore .whl/),
# BENCH_BATCH_IMAGES (24: the batch step's photos),
# BENCH_ONLY (a space-separated subset of the step names below, in their order: tests sync-check cfg batch cfg-kernels
# cfg-fp8 cfg-fp8-kernels quality cfg-compile cfg-compile-warm cfg-compile-kernels cfg-compile-fp8-kernels distilled
# distilled-kernels vae-kernels distilled-graphs cfg-aot cfg-aot-warm cfg-graphs cfg-compile-graphs profile
# offload-model offload-sequential distilled-compile cfg-batch4 distilled-batch4 server; and vae-compile, which runs only when named: it answered
# its question, BENCHMARKS.md G.3). BENCH_ONLY=round2 runs only the steps issue 17 needs, in about 8 minutes;
# BENCH_ONLY=server only issue 13's cold edit, warm server and server-against-batch figures (scripts/server_bench.py:
# a random checkpoint folder written to a temp folder, then the real edit, bench --cold, serve and batch commands;
# BENCH_SERVER_LOOP, 20: the photos of its loop and batch).
# Triton comes with Linux's CUDA torch wheels (its 286 MB wheel is too big to carry); without it the kernel steps
# run the plain ops and their reports say so.
# Steps that would run past the budget are skipped, so the least important come last.
set -uo pipefail
cd "$(dirname "$0")/.."

# The tested versions (.ci/constraints.txt and its resolution); the image's own huggingface_hub and tokenizers suffice.
# The CLI's chain (python -X importtime -m compactedit_cli bench ...): typer (which vendors click) imports pydantic,
# shellingham and annotated-doc; rich's own dependencies come too, for its tracebacks and markup.
# The server step's `serve`: starlette (anyio, idna), uvicorn (h11 and click itself) and python-multipart.
WHEELS=(transformers==5.24.0 diffusers==0.42.1 regex==2026.11.19
    typer==0.29.2 annotated-doc==0.0.7 shellingham==1.5.4
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
    platformdirs==4.14.8 psutil==7.2.2
    starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 python-multipart==0.0.34 anyio==4.16.0 idna==3.20)

if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit $?
fi

OUT_DIR="${1:-${OUT:-bench-results}}"
DEVICE="${BENCH_DEVICE:-cuda}"
WEIGHTS="${BENCH_WEIGHTS:-full}"
read -r -a RESOLUTIONS <<< "${BENCH_RESOLUTIONS:-1024 2048}"
STEPS="${BENCH_STEPS:-20}"
DEADLINE=$((SECONDS + ${BENCH_BUDGET_S:-470}))
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
: > "$LOG"
say() { echo "[gpu_bench $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [ -z "${BENCH_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tee -a "$LOG" || { say "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    say "no .whl/ folder: using the installed packages"
    export PYTHONPATH="$PWD"
fi
COMPACTEDIT_HOME="$(mktemp -d)"  # the defaults and the flags below, never a config file's settings
COMPACTEDIT_CACHE_DIR="$(mktemp -d)"  # a cold compile cache: cfg-compile pays for compiling, cfg-compile-warm not
trap 'rmdir "$COMPACTEDIT_HOME"; rm -rf "$COMPACTEDIT_CACHE_DIR"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false COMPACTEDIT_HOME COMPACTEDIT_CACHE_DIR
[ "${BENCH_ONLY:-}" = round2 ] && BENCH_ONLY="tests cfg cfg-kernels cfg-fp8 cfg-fp8-kernels quality cfg-compile \
cfg-compile-warm cfg-compile-kernels distilled distilled-kernels distilled-graphs vae-kernels cfg-aot cfg-aot-warm"

# The CLI starts, and the machine as every report describes it (compactedit_cli.environment).
python3 -m compactedit_cli --version 2>&1 | tee -a "$LOG" || { say "the compactedit CLI does not start"; exit 1; }
python3 - "$DEVICE" 2>&1 <<'EOF' | tee -a "$LOG" || { say "environment check failed"; exit 1; }
import json, sys
from compactedit_cli.environment import environment_report
print(json.dumps(environment_report(sys.argv[1]), indent=1))
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

# Whether step $1 is wanted (BENCH_ONLY unset or naming it), and whether BENCH_ONLY names it.
named() { [[ " ${BENCH_ONLY:-} " == *" $1 "* ]]; }
want() { [ -z "${BENCH_ONLY:-}" ] || named "$1"; }

# Runs a command with at most $1 seconds, and never past the deadline; skipped when under 20 s are left.
bounded() {
    local cap=$1; shift
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then say "skipped (time budget spent): $*"; return 124; fi
    timeout "$((left < cap ? left : cap))" "$@"
}

# 0. The equivalence tests on this device first, including "no host-device sync in the CUDA denoise loop".
if want tests; then
    say "tests: optimisations on $DEVICE"
    bounded 180 python3 -m pytest -q -p no:cacheprovider tests/test_optimisations.py -m "not slow" \
        -k "cuda or graph or own or offload or norm or feed_forward" 2>&1 | tee -a "$LOG"
    say "tests: the Triton kernels (compiled, not interpreted) and FP8 on $DEVICE"
    bounded 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_vae_kernels.py \
        tests/test_quantize.py 2>&1 | tee -a "$LOG"
    say "tests: --compile auto on $DEVICE (a cold single edit eager, a long run compiled, its size warm after)"
    bounded 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_compile_auto.py -k cuda 2>&1 | tee -a "$LOG"
    say "tests: compile = aot on $DEVICE (a package against the eager blocks, loaded by a new pipeline)"
    bounded 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_aot.py -k cuda 2>&1 | tee -a "$LOG"
fi

[ "$WEIGHTS" = full ] && PROFILE_WEIGHTS=full || PROFILE_WEIGHTS=mid  # the profile has no tiny build

bench() {  # bench NAME CAP_SECONDS [compactedit bench options...]
    local name=$1 cap=$2; shift 2
    want "$name" || return 0
    say "bench $name: $*"
    bounded "$cap" python3 -m compactedit_cli bench --random-weights "$WEIGHTS" --device "$DEVICE" \
        --steps "$STEPS" --save "$OUT_DIR/$name.json" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || say "bench $name ended with status $status"
}

# Most important first: the 3-way CFG numbers the targets are about, eager and compiled, with and without CUDA graphs.
bench sync-check 60 --resolution "${RESOLUTIONS[0]}" --steps 3 --warmup 0 --repeats 1 --sync-check
bench cfg 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3
# Issue 14: a guided batch through the batch engine (decode ahead, write behind): images an hour in the steady
# state, the busy fraction by CUDA events, start-up (model build and first image). OUT_DIR/batch.json.
if want batch; then
    say "batch: guided ${RESOLUTIONS[0]}² batch through the batch engine, images an hour"
    bounded 150 python3 scripts/batch_gpu.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" \
        --resolution "${RESOLUTIONS[0]}" --steps "$STEPS" --images "${BENCH_BATCH_IMAGES:-24}" --out "$OUT_DIR" 2>&1 \
        | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || say "batch ended with status $status"
fi
# Round 2: each new path against cfg; then compiled, twice (cold, then warm cache: first_run_overhead_s of each).
bench cfg-kernels 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --kernels triton
bench cfg-fp8 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --quantize fp8
bench cfg-fp8-kernels 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --quantize fp8 --kernels triton
if want quality; then
    say "quality: latent error and PSNR of each new path against plain bf16 at ${RESOLUTIONS[0]}"
    bounded 120 python3 scripts/speed_quality.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" \
        --resolution "${RESOLUTIONS[0]}" --steps "$STEPS" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
bench cfg-compile 150 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --compile
bench cfg-compile-warm 120 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --compile
bench cfg-compile-kernels 150 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --compile --kernels triton
bench cfg-compile-fp8-kernels 150 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --compile \
    --quantize fp8 --kernels triton
bench distilled 80 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --distilled
bench distilled-kernels 80 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --distilled --kernels triton
# The DC-AE's fused kernels (issue 17, item 4): VAE encode and decode, plain ops against --kernels triton.
if want vae-kernels; then
    say "VAE encode and decode, Triton kernels off against on, at ${RESOLUTIONS[-1]}"
    bounded 120 python3 scripts/profile_gpu.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" --vae-kernels \
        --resolution "${RESOLUTIONS[-1]}" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
# The host-bound one-branch step at 1024²: CUDA graphs (issue 17, item 4).
bench distilled-graphs 60 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 3 --distilled --cuda-graphs
# compile = "aot" (a config key, so its own config folder): the first process builds each size's package (its
# first_run_overhead_s), the second only loads it (what a single edit of a warm size pays).
AOT_HOME="$(mktemp -d)"
COMPACTEDIT_HOME="$AOT_HOME" python3 -m compactedit_cli config set compile aot > /dev/null
COMPACTEDIT_HOME="$AOT_HOME" bench cfg-aot 200 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 3
COMPACTEDIT_HOME="$AOT_HOME" bench cfg-aot-warm 100 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 3
rm -rf "$AOT_HOME"
bench cfg-graphs 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --cuda-graphs
bench cfg-compile-graphs 150 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 3 --compile --cuda-graphs
if want profile; then
    say "profile at ${RESOLUTIONS[-1]}: FLOPs, rates and top kernels per stage; before/afters at ${RESOLUTIONS[0]}"
    bounded 120 python3 scripts/profile_gpu.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" \
        --resolution "${RESOLUTIONS[-1]}" --built-in-resolution "${RESOLUTIONS[0]}" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
bench offload-model 100 --resolution "${RESOLUTIONS[@]}" --warmup 1 --repeats 2 --offload model
bench offload-sequential 70 --resolution "${RESOLUTIONS[0]}" --warmup 0 --repeats 1 --offload sequential
bench distilled-compile 100 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 3 --distilled --compile
# What `batch --batch-size 4` gains per image, against cfg and distilled at batch 1.
bench cfg-batch4 80 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 2 --batch 4
bench distilled-batch4 80 --resolution "${RESOLUTIONS[0]}" --warmup 1 --repeats 2 --batch 4 --distilled
if named vae-compile; then
    say "VAE decoder, eager against torch.compile, at ${RESOLUTIONS[-1]}"
    bounded 150 python3 scripts/profile_gpu.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" --vae-compile \
        --resolution "${RESOLUTIONS[-1]}" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi

# Issue 13: a random checkpoint folder (written first), a cold `edit` process, `bench --cold`, edits through a
# detached `serve` on a private socket, and a loop of edits through it against one `batch`. OUT_DIR/server.json.
if want server; then
    say "server: cold edit, warm server edits and a server loop against batch at ${RESOLUTIONS[0]}²"
    bounded 420 python3 scripts/server_bench.py --device "$DEVICE" --weights "$PROFILE_WEIGHTS" \
        --resolution "${RESOLUTIONS[0]}" --steps "$STEPS" --loop "${BENCH_SERVER_LOOP:-20}" --out "$OUT_DIR" 2>&1 \
        | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || say "server ended with status $status"
fi

say "done in ${SECONDS}s; reports in $OUT_DIR"
ls -l "$OUT_DIR" | tee -a "$LOG"
# One line per report and size, last, so the end of the output is the summary (medians of a whole batch of imgs;
# peak over the timed runs).
python3 - "$OUT_DIR" 2>&1 <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
print(f"{'report':20s} {'size':>9s} {'imgs':>4s} {'e2e s':>7s} {'VLM':>6s} {'VAE enc':>7s} {'denoise':>7s} {'step ms':>7s} "
      f"{'VAE dec':>7s} {'alloc GiB':>9s} {'rsvd GiB':>8s} {'1st +s':>7s}")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    report = json.loads(path.read_text())
    for r in report.get("results", []):
        st, mem, size = r["stages"], r["memory"], r["model_size"]
        peak = mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes", 0)) / 2**30
        reserved = mem.get("peak_reserved_bytes", 0) / 2**30
        print(f"{path.stem:20s} {size['height']:>4d}x{size['width']:<4d} {report['settings']['batch']:4d} "
              f"{st['end_to_end']['median']:7.3f} "
              f"{st['vlm_encode']['median']:6.3f} {st['vae_encode']['median']:7.3f} {st['denoise']['median']:7.3f} "
              f"{st['denoise_step']['median'] * 1e3:7.1f} {st['vae_decode']['median']:7.3f} {peak:9.2f} "
              f"{reserved:8.2f} {r['first_run_overhead_s']:7.1f}")
batch = pathlib.Path(sys.argv[1]) / "batch.json"
if batch.exists():
    b = json.loads(batch.read_text())
    print(f"batch (issue 14): {b['images_per_hour']} images/h steady, busy {b['busy_fraction']} ({b['busy_clock']}), "
          f"start-up {b['startup_seconds']} s, {b['ok']}/{b['images']} ok")
EOF
python3 - "$OUT_DIR" 2>&1 <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
path = pathlib.Path(sys.argv[1]) / "server.json"
if path.exists():
    s = json.loads(path.read_text())
    if "loop_vs_batch" not in s:
        print("server (issue 13): incomplete; see server.json and gpu_bench.log")
    else:
        cold, srv, b = s["cold_edit"], s["server"], s["batch"]
        print(f"server (issue 13): cold edit {cold['process_seconds']} s (bench --cold total "
              f"{cold['bench_cold']['total']:.2f} s), warm server edit {srv['warm_call_median']} s, loop of "
              f"{len(srv['loop']['seconds'])} {srv['loop']['total']} s against batch {b['process_seconds']} s "
              f"(x{s['loop_vs_batch']['loop_over_batch_process']}), same pixels {s['loop_vs_batch']['same_pixels']}")
EOF
