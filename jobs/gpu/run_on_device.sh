#!/usr/bin/env bash
# On the GPU machine (Python 3.12, torch with CUDA, mpi4py, h5py, pytest; no MPI library):
# use the CUDA-aware Open MPI carried as build/cuda-mpi (jobs/gpu/build_cuda_mpi.sh), else
# install the MPICH wheel carried beside the source in wheels/ (jobs/gpu/fetch_wheels.sh),
# then run the prepared GPU command, writing its JSON and log under $OUT.
#
#   carry build/cuda-mpi (or wheels/) with the source, then:  bash jobs/gpu/run_on_device.sh
#
# Extra arguments go to `python -m mpicnn.bench gpu` (e.g. --parts eager,compiled, --models
# seednet). jobs/gpu/prepare.sh makes what to carry (build/cuda-mpi, build/fashion.h5).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
# the wheel's mpirun lands in this interpreter's scripts folder (or ~/.local/bin)
PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export PATH
if [ -x build/cuda-mpi/bin/mpirun ]; then       # first on PATH; mpi4py loads its libmpi
    source jobs/gpu/cuda_mpi_env.sh build/cuda-mpi
fi
if ! command -v mpirun >/dev/null 2>&1; then
    ls wheels/mpich-*.whl >/dev/null 2>&1 || {
        echo "mpicnn: error: no wheels/mpich-*.whl: run jobs/gpu/fetch_wheels.sh first" >&2
        exit 2
    }
    python -m pip install --quiet --no-index --find-links wheels/ mpich
    hash -r
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch, mpi4py; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mpi4py', mpi4py.__version__)"
    mpirun --version | sed -n 1,2p
    PYTHON=python bash jobs/gpu/check_cuda_mpi.sh
} 2>&1 | tee "$OUT/env.txt" || true
fashion=()
[ -f build/fashion.h5 ] && fashion=(--fashion build/fashion.h5)
timeout -s KILL 540 python -m mpicnn.bench gpu --out "$OUT/gpu.json" "${fashion[@]}" "$@" 2>&1 |
    tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
