#!/usr/bin/env bash
# Build onebit.engine._native with AddressSanitizer + UndefinedBehaviorSanitizer and run the
# engine/kernel tests (and the Python-driven fuzzing of the native entry points) against it.
#
#   fuzz/asan_engine_tests.sh                 # build/asan, then the default test set
#   fuzz/asan_engine_tests.sh tests/test_kernels.py -k gemm     # other pytest arguments
#   ASAN_SKIP_BUILD=1 fuzz/asan_engine_tests.sh ...             # reuse the last build
#   fuzz/asan_engine_tests.sh --atheris -atheris_runs=20000 build/fuzz-corpus
#                                                    # the atheris harness instead of pytest
#
# How it works
# - The existing CMakeLists.txt is configured into build/asan with extra flags (nothing in the
#   project files changes): -fsanitize=address,undefined -fno-sanitize-recover=all
#   -fno-omit-frame-pointer -g, also on the module's link line.
# - The package is copied to build/asan/site/onebit with the sanitized _native*.so in place of
#   the normal one, so the dev build in src/ (used by everyone else) is never touched.
# - CPython itself is not instrumented, so the ASan runtime must be loaded first: LD_PRELOAD
#   of libasan.so (and libubsan.so) from the same gcc. Leak detection is off (the
#   interpreter "leaks" by design at exit); allocator_may_return_null=1 lets the tests that
#   ask numpy for absurd sizes see a MemoryError instead of an ASan abort.
# - Any ASan/UBSan report aborts the process: pytest then dies with a non-zero status and the
#   report is in the output (and in build/asan/reports/*).
#
# Compiling the C++ for libFuzzer coverage needs clang (-fsanitize=fuzzer), which this machine
# does not have (gcc 12 only): the native entry points are fuzzed from Python under this build,
# by Hypothesis (tests/test_fuzz.py) and by atheris (fuzz/fuzz_onebit_atheris.py, coverage of
# the Python side of the engine, mutations reaching the kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=$ROOT/build/asan
CXX=$(command -v "${CXX:-g++}")
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"

if [[ -z "${ASAN_SKIP_BUILD:-}" ]]; then
    cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_CXX_COMPILER="$CXX" \
        -DCMAKE_CXX_FLAGS="$SAN" \
        -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
        -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
        -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" >/dev/null
    cmake --build "$BUILD"
fi

SITE=$BUILD/site
rm -rf "$SITE"
mkdir -p "$SITE" "$BUILD/reports"
cp -r "$ROOT/src/onebit" "$SITE/onebit"
rm -f "$SITE"/onebit/engine/_native*.so
cp "$BUILD"/_native*.so "$SITE/onebit/engine/"

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:log_path=$BUILD/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$BUILD/reports/ubsan"
export PYTHONPATH="$SITE"
export ONEBIT_EXPECT_SANITIZED=1   # tests/test_fuzz.py checks that this build is the one imported
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [[ $# -eq 0 ]]; then
    set -- tests/test_kernels.py tests/test_export.py tests/test_format.py tests/test_fuzz.py \
        tests/test_engine_concurrency.py
fi
rm -f "$BUILD"/reports/*
status=0
if [[ "${1:-}" == "--atheris" ]]; then
    shift
    python "$ROOT/fuzz/fuzz_onebit_atheris.py" "$@" || status=$?
else
    python -m pytest -q -p no:cacheprovider "$@" || status=$?
fi
if compgen -G "$BUILD/reports/*" >/dev/null; then
    echo "sanitizer reports:" >&2
    cat "$BUILD"/reports/* >&2
    status=${status/#0/1}
fi
echo "asan_engine_tests: exit status $status"
exit "$status"
