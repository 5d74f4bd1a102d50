#!/usr/bin/env bash
# Make what the GPU machine needs beside the source (it cannot download), and print what
# to carry (at most 64 MiB with the tree):
#
#   build/cuda-mpi    a CUDA-aware Open MPI (jobs/gpu/build_cuda_mpi.sh: ~10 min on 2 cores,
#                     once; 14 MiB); without it, wheels/ holds the MPICH wheel (staged only)
#   build/fashion.h5  Fashion-MNIST, gzip-compressed (32 MB), from Debian's
#                     dataset-fashion-mnist, for bench gpu's Fashion recipe
#
#   bash jobs/gpu/prepare.sh [--no-mpi-build]
# then carry the printed paths and run: bash jobs/gpu/run_on_device.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if [ ! -x build/cuda-mpi/bin/mpirun ]; then
    if [ "${1:-}" = "--no-mpi-build" ]; then
        bash jobs/gpu/fetch_wheels.sh
    else
        bash jobs/gpu/build_cuda_mpi.sh
    fi
fi
FASHION_IDX=${FASHION_IDX:-/usr/share/datasets/fashion-mnist}
if [ ! -f build/fashion.h5 ]; then
    if [ -d "$FASHION_IDX" ]; then
        mkdir -p build
        "$PYTHON" -m mpicnn.data convert "$FASHION_IDX" build/fashion.h5 --compression gzip
    else
        echo "note: no $FASHION_IDX (apt-get install dataset-fashion-mnist): bench gpu will" \
             "skip its Fashion-MNIST part" >&2
    fi
fi
carry=()
if [ -x build/cuda-mpi/bin/mpirun ]; then carry+=(build/cuda-mpi); else carry+=(wheels); fi
[ -f build/fashion.h5 ] && carry+=(build/fashion.h5)
echo "carry:"
du -sh "${carry[@]}"
