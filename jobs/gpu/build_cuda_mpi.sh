#!/usr/bin/env bash
# Build a CUDA-aware Open MPI 5 into a small, relocatable prefix (default build/cuda-mpi).
#
#   bash jobs/gpu/build_cuda_mpi.sh            # then: source jobs/gpu/cuda_mpi_env.sh
#
# What and why.
# - Open MPI 5.0.7 with its CUDA accelerator component, not MPICH --with-cuda: Open MPI
#   builds its CUDA support as plug-ins (mca_accelerator_cuda.so and friends) that load
#   libcuda.so.1 when MPI starts, so one build runs on CPU machines too (the plug-in is
#   skipped: no driver) and needs only cuda.h to compile. MPICH links libcuda and
#   libcudart into libmpi itself and builds its datatype kernels with nvcc: it would not
#   load on a machine without a driver, and would need the whole toolkit here.
# - Sources reachable from here, nothing else: the upstream tarball as Debian ships it
#   (trixie's source package openmpi 5.0.7-1, fetched with apt into a private list, the
#   system's apt configuration untouched; its 3rd-party/ holds hwloc, libevent, PMIx
#   and PRRTE, all built in), and cuda.h from PyPI's nvidia-cuda-runtime wheel (CUDA 13.0,
#   the toolkit torch cu130 and the GPU machine use). Where CUDA_HOME/include/cuda.h
#   exists (a CUDA toolkit, as on the GPU machine), that one is used instead. Linking
#   needs a libcuda.so: a stub with the driver API's names, generated from cuda.h, is
#   linked against and never installed; at run time the real driver is loaded.
# - How the product reaches the GPU machine: built HERE and carried (run's carry:
#   build/cuda-mpi). Measured from a fresh clone on this 2-core machine, nice -n 19 make
#   -j2: 9 min 19 s (420 CPU-seconds; configure, mostly serial, about 3.5 min of it), and
#   24 min 48 s while other jobs kept the load near 10. The GPU machine cannot download
#   and lends 15 minutes a session, start included: even on 16 cores the serial
#   configure alone would take minutes of it on every fresh machine. The prefix,
#   stripped, without docs, man pages, static or libtool files, is 14 MiB (451 files;
#   the carry limit is 64 MiB with the tree). It needs glibc >= 2.36 (the bundled
#   libevent calls arc4random, and its own fallback does not compile beside glibc 2.36)
#   and nothing else outside it; the GPU image's Python 3.12.3 is Ubuntu 24.04's, glibc
#   2.39 (check_cuda_mpi.sh prints it there). On an older glibc, build there instead:
#   carry build/cuda-mpi-work/openmpi_5.0.7.orig.tar.xz (25 MiB) and run
#   OMPI_TARBALL=that-file bash jobs/gpu/build_cuda_mpi.sh (its toolkit's cuda.h is used).
#   The prefix is relocatable: jobs/gpu/cuda_mpi_env.sh sets OPAL_PREFIX to where it lies.
# - mpi4py: the mpi4py 4 wheel needs no rebuild. It picks its Open MPI or MPICH
#   extension from the libmpi it finds (MPI4PY_LIBMPI, then LD_LIBRARY_PATH);
#   cuda_mpi_env.sh points it at this prefix.
#
# Environment: PREFIX (install here, default build/cuda-mpi), WORK (sources and objects,
# default build/cuda-mpi-work), JOBS (make -j, default: the number of cores),
# CUDA_HOME (a toolkit whose include/cuda.h to build against, default /usr/local/cuda),
# OMPI_TARBALL (this openmpi 5.0.7 tarball instead of fetching one). Run from anywhere;
# takes no arguments.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PREFIX=$(realpath -m "${PREFIX:-$ROOT/build/cuda-mpi}")
WORK=$(realpath -m "${WORK:-$ROOT/build/cuda-mpi-work}")
JOBS=${JOBS:-$(nproc)}
OMPI_VERSION=5.0.7
OMPI_DEBIAN=5.0.7-1
OMPI_SHA256=97f10c04e9b9a1771db3fd005009e4c07afa3ce739f940e41eb0fc7397cb9473
CUDA_WHEEL=nvidia-cuda-runtime==13.0.96
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

die() { echo "mpicnn: error: $*" >&2; exit 2; }
say() { echo "[build_cuda_mpi] $*"; }

[ $# -eq 0 ] || die "build_cuda_mpi.sh takes no arguments (settings are environment variables)"
mkdir -p "$WORK"

fetch_source() {         # the orig tarball of Debian's openmpi source package, checked
    local tarball=${OMPI_TARBALL:-$WORK/openmpi_$OMPI_VERSION.orig.tar.xz}
    if [ ! -f "$tarball" ]; then
        [ -z "${OMPI_TARBALL:-}" ] || die "OMPI_TARBALL=$OMPI_TARBALL: no such file"
        command -v apt-get >/dev/null || die "no apt-get to fetch the Open MPI source; set \
OMPI_TARBALL to an openmpi-$OMPI_VERSION tarball"
        local apt=$WORK/apt
        mkdir -p "$apt/lists/partial"
        echo "deb-src http://deb.debian.org/debian trixie main" >"$apt/sources.list"
        local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
                 -o "Dir::State::Lists=$apt/lists" -o "APT::Sandbox::User=root")
        say "fetching Debian's openmpi $OMPI_DEBIAN source package"
        apt-get "${o[@]}" -qq update
        (cd "$WORK" && apt-get "${o[@]}" -qq source --download-only "openmpi=$OMPI_DEBIAN")
    fi
    echo "$OMPI_SHA256  $tarball" | sha256sum -c --quiet - ||
        die "$tarball is not Debian's openmpi_$OMPI_VERSION.orig.tar.xz, which this script builds"
    rm -rf "$WORK/openmpi-$OMPI_VERSION"
    tar -C "$WORK" -xf "$tarball"
    [ -x "$WORK/openmpi-$OMPI_VERSION/configure" ] || die "$tarball holds no openmpi-$OMPI_VERSION/configure"
}

cuda_headers() {         # a directory whose include/ holds cuda.h
    if [ -f "$CUDA_HOME/include/cuda.h" ]; then
        echo "$CUDA_HOME"
        return
    fi
    local dir=$WORK/cuda
    if [ ! -f "$dir/include/cuda.h" ]; then
        say "fetching cuda.h from PyPI's $CUDA_WHEEL wheel" >&2
        mkdir -p "$dir/wheel" "$dir/include"
        python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
            --python-version 3.12 -d "$dir/wheel" "$CUDA_WHEEL" >&2
        python3 - "$dir" <<'EOF'
import glob, pathlib, sys, zipfile
target = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{target}/wheel/*.whl")[0]) as wheel:
    headers = [n for n in wheel.namelist() if "/include/" in n and n.endswith(".h")]
    for name in headers:
        path = pathlib.Path(target, "include", name.rsplit("/include/", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wheel.read(name))
EOF
    fi
    [ -f "$dir/include/cuda.h" ] || die "no cuda.h in the $CUDA_WHEEL wheel"
    echo "$dir"
}

libcuda_stub() {         # a libcuda.so.1 with every driver-API name, for the linker only
    local cuda=$1 stub=$WORK/stubs
    mkdir -p "$stub"
    # the names as written (cuMemFree, which configure links against) and as the header's
    # macros make them (cuMemFree_v2, which the plug-ins call): the driver exports both
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$cuda"/include/cuda.h | sort -u |
        sed 's/.*/int &(void) { return 100; }/' >"$stub/libcuda.c"   # CUDA_ERROR_NO_DEVICE
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda.c"
    echo "$stub"
}

started=$(date +%s)
fetch_source
CUDA=$(cuda_headers)
STUB=$(libcuda_stub "$CUDA")
say "configuring Open MPI $OMPI_VERSION (cuda.h from $CUDA) into $PREFIX"
BUILD=$WORK/openmpi-$OMPI_VERSION
rm -rf "$PREFIX"
(
    cd "$BUILD"
    # Only what a pip-installed Python job needs: C bindings, shared libraries, the
    # bundled runtime (PRRTE, PMIx, hwloc, libevent), CUDA plug-ins; no network
    # transports beyond TCP and shared memory, which need libraries the GPU machine lacks.
    ./configure -q --prefix="$PREFIX" \
        --with-cuda="$CUDA" --with-cuda-libdir="$STUB" \
        --with-hwloc=internal --with-libevent=internal --with-pmix=internal \
        --with-prrte=internal --disable-mpi-fortran --disable-oshmem --disable-io-romio \
        --disable-static --disable-sphinx --without-ucx --without-ofi --without-psm2 \
        --without-portals4 --without-ucc --without-hcoll --without-lustre \
        --without-gpfs >"$WORK/configure.log" 2>&1 ||
        { tail -30 "$WORK/configure.log"; die "configure failed (see $WORK/configure.log)"; }
    grep -q "^#define OPAL_CUDA_SUPPORT 1" opal/include/opal_config.h ||
        die "configure did not enable CUDA (see $WORK/configure.log)"
    say "building with nice -n 19 make -j$JOBS"
    nice -n 19 make -j"$JOBS" >"$WORK/make.log" 2>&1 ||
        { tail -30 "$WORK/make.log"; die "make failed (see $WORK/make.log)"; }
    nice -n 19 make install-strip >"$WORK/install.log" 2>&1 ||
        { tail -30 "$WORK/install.log"; die "make install failed (see $WORK/install.log)"; }
)
# What a job never reads: documentation, man pages, libtool archives, static libraries,
# hwloc's own tools (lstopo needs ncurses).
rm -rf "$PREFIX/share/doc" "$PREFIX/share/man" "$PREFIX/sbin" "$PREFIX"/bin/hwloc-* \
    "$PREFIX"/bin/lstopo*
find "$PREFIX" \( -name '*.la' -o -name '*.a' \) -delete
ls "$PREFIX"/lib/openmpi/mca_accelerator_cuda.so >/dev/null 2>&1 ||
    die "the CUDA accelerator plug-in was not built (see $WORK/make.log)"
if readelf -d "$PREFIX"/lib/openmpi/mca_accelerator_cuda.so | grep -q "$STUB"; then
    die "the CUDA plug-in points at the build's libcuda stub"
fi
glibc=$( { objdump -T "$PREFIX"/lib/*.so.*[0-9] "$PREFIX"/lib/openmpi/*.so "$PREFIX"/bin/* \
            2>/dev/null || true; } | grep -oE 'GLIBC_[0-9.]+' | sort -V | tail -1)
say "done in $(( $(date +%s) - started )) s: $(du -sh "$PREFIX" | cut -f1) in $PREFIX, needs ${glibc:-glibc}"
say "use it: source jobs/gpu/cuda_mpi_env.sh; jobs/gpu/check_cuda_mpi.sh"
