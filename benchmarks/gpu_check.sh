#!/usr/bin/env bash
# One prepared check for a machine with one GPU and no network (jax with CUDA, flax, optax and
# orbax already installed). Installs whatever else is missing from wheels prepared beforehand
# (benchmarks/prepare_gpu_wheels.sh, run on a machine with PyPI), runs the loss exactness tests on
# the GPU at matmul precision "highest", then the train-step throughput of ResNet-50 at 112 px,
# P×K = 45×40, in bfloat16 and float32. Everything is written to one folder.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUTPUT_DIR]      (default OUTPUT_DIR: $OUT or ./gpu_check)
#
# --cpu: the same script at CPU size (tiny model and batch), to test it where there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
OUTDIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
exec > >(tee "$OUTDIR/log.txt") 2>&1
echo "== gpu_check ($MODE) $(date -u +%FT%TZ) -> $OUTDIR"

missing=$($PY - <<'PY'
import importlib.util
need = {"ml_collections": "ml-collections", "absl": "absl-py", "tqdm": "tqdm", "PIL": "pillow",
        "tensorboardX": "tensorboardX", "matplotlib": "matplotlib", "pytest": "pytest",
        "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint"}
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
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUTDIR/devices.txt"
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true

if [[ "$MODE" == gpu ]]; then
  export JAX_PLATFORMS=cuda
  BENCH=(--models resnet50 --batches 45x40 --devices 1 --dtypes bfloat16,float32 --steps 10)
  TEST_TIMEOUT=240
else
  export JAX_PLATFORMS=cpu
  BENCH=(--models small_cnn --batches 8x4 --devices 1 --dtypes bfloat16,float32 --steps 2)
  TEST_TIMEOUT=600
fi

echo "== loss exactness tests (matmul precision highest)"
timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider tests/test_losses.py \
  --junitxml="$OUTDIR/test_losses.xml" 2>&1 | tail -n 25
tests_rc=${PIPESTATUS[0]}

echo "== train-step throughput"
timeout 300 $PY benchmarks/train_step.py "${BENCH[@]}" --output "$OUTDIR/train_step.json"
bench_rc=$?
echo "== done: tests rc=$tests_rc, benchmark rc=$bench_rc"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
