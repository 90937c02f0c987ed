#!/usr/bin/env bash
# Downloads, where PyPI is reachable, the wheels gpu_check.sh may need on a GPU machine without
# network (default: Python 3.12, x86_64 Linux with glibc ≥ 2.28; pip also accepts the older
# manylinux tags under that one). They go to benchmarks/wheels/ (git-ignored: carry the folder
# to the GPU machine). jax, jaxlib, numpy and scipy (a jax dependency) are not fetched: the GPU
# machine has them, and pip keeps installed versions that satisfy the requirements.
#
#   bash benchmarks/prepare_gpu_wheels.sh [PYTHON_VERSION]        (e.g. 3.12)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --only-binary=:all: --python-version "${1:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform any --no-deps \
  -d wheels ml-collections absl-py PyYAML tqdm pillow tensorboardX matplotlib pytest \
  contourpy cycler fonttools kiwisolver packaging pyparsing python-dateutil six protobuf \
  iniconfig pluggy pygments
du -sh wheels
