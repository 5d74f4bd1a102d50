#!/usr/bin/env bash
# Fetch the MPICH wheel the GPU machine needs (Python 3.12, x86_64) into wheels/ (git-ignored).
#
# Pin the version: unpinned, pip picks the 1 kB placeholder "mpich 0.0.0" (py3-none-any),
# because the real wheels are tagged manylinux_2_28, not manylinux2014.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${MPICH_VERSION:-$(python -c "import importlib.metadata as m; print(m.version('mpich'))" 2>/dev/null || echo 5.0.2)}
python -m pip download "mpich==${version}" --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels/
ls -l wheels/
