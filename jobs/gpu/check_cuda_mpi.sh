#!/usr/bin/env bash
# Is the MPI on PATH CUDA-aware, and what does mpicnn's --cuda-aware do with it?
#
#   bash jobs/gpu/check_cuda_mpi.sh
#   source jobs/gpu/cuda_mpi_env.sh && bash jobs/gpu/check_cuda_mpi.sh   # the one built here
#
# Prints what the library was built with (Open MPI: ompi_info; MPICH: mpichversion), then
# the run-time answer of mpicnn's probe (MPIX_Query_cuda_support and friends, asked after
# MPI_Init) in this process and in both ranks of a 2-rank job, which must agree, and what
# --cuda-aware auto, on and off do on a GPU rank with that answer. A library built with
# CUDA answers "yes" at run time only where the CUDA driver loads (a GPU machine).
# Exits 0 whatever the answer; 2 when the probe could not be run or the answers differ.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
launcher=$(command -v mpirun || command -v mpiexec || true)
echo "glibc: $(getconf GNU_LIBC_VERSION)"
echo "launcher: ${launcher:-none on PATH}"
[ -z "$launcher" ] || "$launcher" --version 2>&1 | sed -n '/./p' | sed -n 1,2p
# the build-time answer, from the tools installed beside the launcher
tools=$( [ -n "$launcher" ] && dirname "$launcher" || true)
ompi_info=${tools:+$tools/}ompi_info mpichversion=${tools:+$tools/}mpichversion
flags=()
if command -v "$ompi_info" >/dev/null; then
    flags=(--oversubscribe)          # Open MPI will not start more ranks than cores without
    # opal_... in Open MPI 5, mpi_... in 4.x
    built=$("$ompi_info" --parsable --all 2>/dev/null |
            sed -n -E 's/^(.*:)?(opal|mpi)_built_with_cuda_support:value://p' | head -1)
    echo "Open MPI built with CUDA support: ${built:-unknown}"
    echo "Open MPI accelerator plug-ins found: $("$ompi_info" 2>/dev/null |
          sed -n 's/.*MCA accelerator: \([a-z]*\).*/\1/p' | tr '\n' ' ')"
elif command -v "$mpichversion" >/dev/null; then
    "$mpichversion" | sed -n '/Version:/p'
    if "$mpichversion" | grep -q -- "--with-cuda"; then
        echo "MPICH configured --with-cuda (it also needs MPIR_CVAR_ENABLE_GPU=1, the default)"
    else
        echo "MPICH configured without --with-cuda"
    fi
fi
here=$("$PYTHON" -c 'import json
from mpicnn.sync.allreduce.transport import probe_cuda_support
print(json.dumps(list(probe_cuda_support())))') ||
    { echo "mpicnn: error: the probe could not run in $PYTHON (mpi4py installed?)" >&2; exit 2; }
echo "probe in this process: $here"
if [ -n "$launcher" ]; then
    ranks=$(PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
            "$launcher" -n 2 "${flags[@]}" "$PYTHON" tests/probe_check.py | tail -1)
    echo "probe in a 2-rank job: $ranks"
    [ "$ranks" = "[$here, $here]" ] ||
        { echo "mpicnn: error: the probe answered differently under $launcher" >&2; exit 2; }
fi
"$PYTHON" - "$here" <<'EOF'
import json
import sys

from mpicnn.cluster.errors import MpicnnError
from mpicnn.sync.allreduce.transport import choose_path

answer = tuple(json.loads(sys.argv[1]))
print(f"CUDA-aware: {dict([(True, 'yes'), (False, 'no'), (None, 'cannot tell')])[answer[0]]}")
for setting in ("auto", "on", "off"):
    try:
        direct, why = choose_path(setting, "cuda", None, lambda: answer)
        what = "CUDA buffers to MPI directly" if direct else "staged through pinned host memory"
        print(f"  --cuda-aware {setting:<4}: {what} ({why})")
    except MpicnnError as exc:
        print(f"  --cuda-aware {setting:<4}: refused on every rank: {exc}")
EOF
