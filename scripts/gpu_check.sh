#!/usr/bin/env bash
# The GPU check: one run (< 8 min) on an H100/H200 machine with no internet. Runs the GPU tests
# and both benchmarks on a Llama-3.2-1B-shaped random bf16 model; writes JSON (and logs) to
# $OUT (default out/gpu). Needs torch with CUDA, triton and transformers.
#
# $OUT gets few files (the device tool returns at most 8): summary.json (every step's JSON and
# exit status), gpu_check.tgz (all logs and JSON), engine.png, transfer.png. They are refreshed
# after every step, so a run cut short still returns what it measured.
#
# Optional extras travel in build/gpu_carry (make it with scripts/gpu_carry.sh): pure-Python
# packages the machine may lack (redis-py) under py/, and a redis-server binary for
# the lease timings.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
WORK="$(mktemp -d /tmp/slaq-gpu-check.XXXXXX)"
mkdir -p "$OUT"
CARRY="$PWD/build/gpu_carry"
export PYTHONPATH="$PWD${CARRY:+:$CARRY/py}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
T0=$(date +%s)
step() {  # step NAME TIMEOUT_S CMD...: run, log, record the exit status
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "== $name (limit ${limit}s, at +$((t - T0))s)"
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$WORK/steps.txt"
  tail -n 5 "$WORK/$name.log"
  bundle
}
bundle() {  # summary.json + tarball + plots into $OUT
  "$PY" - "$WORK" "$OUT/summary.json" <<'EOF2'
import json, pathlib, sys
work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
summary = {"steps": (work / "steps.txt").read_text().splitlines()
           if (work / "steps.txt").exists() else []}
for f in sorted(work.glob("*.json")):
    try:
        summary[f.stem] = json.loads(f.read_text())
    except ValueError:
        summary[f.stem] = f.read_text()[-4000:]
dest.write_text(json.dumps(summary, indent=1) + "\n")
EOF2
  tar -czf "$OUT/gpu_check.tgz" --exclude=./inductor --exclude=./triton -C "$WORK" . 2>/dev/null
  for png in "$WORK"/engine.png "$WORK"/transfer.png; do [ -f "$png" ] && cp "$png" "$OUT/"; done
  return 0
}

nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
"$PY" - >"$WORK/env.json" 2>&1 <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}
for mod in ("triton", "transformers", "redis", "pytest", "nixl_cu12", "matplotlib"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001
        info[mod] = f"missing ({type(exc).__name__})"
print(json.dumps(info, indent=2))
EOF
cat "$WORK/env.json"

# A throwaway Redis for the lease timings, when a server binary is at hand.
REDIS_BIN="$(command -v redis-server || true)"
[ -z "$REDIS_BIN" ] && [ -x "$CARRY/redis-server" ] && REDIS_BIN="$CARRY/redis-server"
if [ -n "$REDIS_BIN" ]; then
  "$REDIS_BIN" --port 6399 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir /tmp >/dev/null 2>&1 && export SLAQ_REDIS_URL="redis://127.0.0.1:6399/0"
fi

# Inductor's caches live in the work dir: every step after the first reuses its kernels.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"
# SLAQ_GPU_STEPS picks and orders the steps (a short device budget runs fewer).
for s in ${SLAQ_GPU_STEPS:-transfer engine breakdown parity kernels gpu_tests}; do
  case $s in
    transfer) step transfer 60 "$PY" scripts/gpu_bench.py transfer "$WORK" ;;
    engine) step engine 200 "$PY" scripts/gpu_bench.py engine "$WORK" ;;
    breakdown) step breakdown 110 "$PY" scripts/gpu_bench.py breakdown "$WORK" ;;
    parity) step parity 60 "$PY" scripts/gpu_bench.py parity "$WORK" ;;
    kernels) step kernels 30 "$PY" scripts/gpu_bench.py kernels "$WORK" ;;
    prefix) step prefix 90 "$PY" scripts/gpu_bench.py prefix "$WORK" ;;
    prefix_profile) step prefix_profile 90 "$PY" scripts/gpu_bench.py prefix_profile "$WORK" ;;
    calibrate) step calibrate 150 "$PY" scripts/gpu_calibrate.py "$WORK" ;;
    gpu_tests) step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
      -W default ${SLAQ_GPU_TESTS:-tests/gpu} --junitxml="$WORK/gpu_tests.xml" ;;
    *) echo "unknown step $s" ;;
  esac
done

[ -n "${SLAQ_REDIS_URL:-}" ] && "$PY" -c "import redis; redis.Redis(port=6399).shutdown(nosave=True)" \
  >/dev/null 2>&1
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$WORK/steps.txt"
bundle
