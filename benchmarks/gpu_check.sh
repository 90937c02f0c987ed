#!/usr/bin/env bash
# One prepared check for a machine with one GPU and no network (jax with CUDA, flax, optax and
# orbax already installed). Installs whatever else is missing from wheels prepared beforehand
# (benchmarks/prepare_gpu_wheels.sh, run on a machine with PyPI), runs the loss exactness tests on
# the GPU at matmul precision "highest", then the train-step throughput of ResNet-50 at 112 px,
# P×K = 45×40, in bfloat16 and float32, and the semi-hard loss by anchor block size
# (mining_breakdown.txt). Everything is written to one folder. On the GPU the whole
# check stays within 8 minutes: the benchmark runs first (≤ 240 s; its JSON is rewritten after
# every row, so a cut-off run keeps what it measured), the tests get the time left up to 470 s
# (one line per test in tests.txt, so a cut-off run shows which passed).
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUTPUT_DIR]      (default OUTPUT_DIR: $OUT or ./gpu_check)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh ... (default: python3)
#
# --cpu: the same script at CPU size (tiny model and batch, the same tests), to test it where
# there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
OUTDIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
exec > >(tee "$OUTDIR/log.txt") 2>&1
echo "== gpu_check ($MODE) $(date -u +%FT%TZ) -> $OUTDIR"

# Import name -> distribution, for what the tests and the benchmark import besides jax.
missing=$($PY - <<'PY'
import importlib.util
need = {"ml_collections": "ml-collections", "absl": "absl-py", "yaml": "PyYAML", "tqdm": "tqdm",
        "PIL": "pillow", "tensorboardX": "tensorboardX", "matplotlib": "matplotlib",
        "pytest": "pytest", "scipy": "scipy", "flax": "flax", "optax": "optax",
        "orbax.checkpoint": "orbax-checkpoint"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod.split(".")[0]) is None))
PY
)
if [[ -n "$missing" ]]; then
  echo "installing from benchmarks/wheels: $missing"
  $PY -m pip install --no-index --find-links benchmarks/wheels $missing || {
    echo "FAILED: missing packages ($missing) and no usable wheels in benchmarks/wheels;" \
         "run benchmarks/prepare_gpu_wheels.sh where PyPI is reachable"; exit 2; }
fi
# The package itself, without touching the machine's jax: put the repo on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$MODE" == gpu ]]; then
  export JAX_PLATFORMS=cuda
  # --share alone: one compile per dtype (the difference method's second compile of ResNet-50
  # would not fit the 8 minutes); the loss runs between the encoder's forward and backward
  # passes, so timing it alone is a fair share on a GPU.
  BENCH=(--models resnet50 --batches 45x40 --devices 1 --dtypes bfloat16,float32 --steps 10
         --rounds 2 --share alone)
  BENCH_TIMEOUT=240; TOTAL_BUDGET=470
  # The semi-hard loss alone: the default blocks (one block up to B = 4,096 on accelerators)
  # beside the CPU's small ones, to decide ACCELERATOR_CHUNK_ELEMENTS.
  MINING=(--sizes 1024x4,1800x40 --anchor-chunks auto,512,225 --repeats 20); MINING_TIMEOUT=90
else
  export JAX_PLATFORMS=cpu
  BENCH=(--models small_cnn --batches 8x4 --devices 1 --dtypes bfloat16,float32 --steps 2
         --rounds 1)
  MINING=(--sizes 64x4 --anchor-chunks auto,16 --repeats 2); MINING_TIMEOUT=300
  BENCH_TIMEOUT=600; TOTAL_BUDGET=$((SECONDS + BENCH_TIMEOUT + 1200))
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUTDIR/devices.txt"
{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER; } > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
lscpu > "$OUTDIR/lscpu.txt" 2>&1 || true
git rev-parse HEAD > "$OUTDIR/commit.txt" 2>/dev/null || true

echo "== train-step throughput"
timeout "$BENCH_TIMEOUT" $PY benchmarks/train_step.py "${BENCH[@]}" \
  --output "$OUTDIR/train_step.json" --overwrite  # OUTDIR is this check's own folder
bench_rc=$?

echo "== semi-hard loss by anchor block size (≤ ${MINING_TIMEOUT} s)"
timeout "$MINING_TIMEOUT" $PY benchmarks/mining_breakdown.py "${MINING[@]}" \
  | tee "$OUTDIR/mining_breakdown.txt"

TEST_TIMEOUT=$((TOTAL_BUDGET - SECONDS)); (( TEST_TIMEOUT < 60 )) && TEST_TIMEOUT=60
echo "== loss exactness tests (matmul precision highest, ≤ ${TEST_TIMEOUT} s)"
# tests/conftest.py also sets it; exported here so the precision is explicit in this script.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$TEST_TIMEOUT" $PY -m pytest -v \
  -p no:cacheprovider tests/test_losses.py --junitxml="$OUTDIR/test_losses.xml" \
  > "$OUTDIR/tests.txt" 2>&1
tests_rc=$?
grep -c " PASSED" "$OUTDIR/tests.txt" | sed 's/^/passed: /'
tail -n 15 "$OUTDIR/tests.txt"
echo "== done $(date -u +%FT%TZ) after ${SECONDS} s: tests rc=$tests_rc, benchmark" \
     "rc=$bench_rc (124: timed out)"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
