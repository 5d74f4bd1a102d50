# Source me: the CUDA-aware Open MPI that jobs/gpu/build_cuda_mpi.sh built goes first on the
# paths, wherever its prefix now lies, and mpi4py loads it.
#
#   source jobs/gpu/cuda_mpi_env.sh [PREFIX]      (default: build/cuda-mpi of this checkout)
#
# The mpi4py 4 wheel needs no rebuild: it picks its Open MPI extension for the libmpi that
# MPI4PY_LIBMPI names. OPAL_PREFIX tells Open MPI (and its PRRTE and PMIx) where its
# plug-ins and help files are now, since the prefix was built at another path.
_cuda_mpi_prefix=${1:-$(dirname "${BASH_SOURCE[0]}")/../../build/cuda-mpi}
if [ ! -x "$_cuda_mpi_prefix/bin/mpirun" ]; then
    echo "mpicnn: error: no MPI built at $_cuda_mpi_prefix: run jobs/gpu/build_cuda_mpi.sh" >&2
    unset _cuda_mpi_prefix
    return 2 2>/dev/null || exit 2
fi
_cuda_mpi_prefix=$(cd "$_cuda_mpi_prefix" && pwd)
export OPAL_PREFIX=$_cuda_mpi_prefix
export PATH=$_cuda_mpi_prefix/bin:$PATH
export LD_LIBRARY_PATH=$_cuda_mpi_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MPI4PY_LIBMPI=$_cuda_mpi_prefix/lib/libmpi.so.40
if ! "${PYTHON:-python3}" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
    # no CUDA driver here: the CUDA plug-ins cannot load, as expected; say so once, not
    # in every rank of every job
    echo "note: no CUDA driver (libcuda.so.1) here: this MPI runs, but not CUDA-aware" >&2
    export OMPI_MCA_mca_base_component_show_load_errors=^accelerator/cuda,rcache/gpusm,rcache/rgpusm
fi
if [ "$(id -u)" = 0 ]; then       # Open MPI's launcher refuses root without both
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
hash -r
unset _cuda_mpi_prefix
