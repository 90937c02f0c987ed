#!/usr/bin/env bash
# Downloads, where PyPI is reachable, the wheels gpu_check.sh may need on a GPU machine without
# network (Python 3.12, x86_64 Linux). They go to benchmarks/wheels/ (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d wheels ml-collections absl-py PyYAML tqdm pillow tensorboardX matplotlib pytest \
  contourpy cycler fonttools kiwisolver packaging pyparsing python-dateutil six protobuf \
  iniconfig pluggy pygments
