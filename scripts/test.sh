#!/bin/sh
# Builds and runs all tests. Installs the Debian packages it needs first.
#   scripts/test.sh             Release build, every test
#   scripts/test.sh --sanitize  the same suite under AddressSanitizer + UndefinedBehaviorSanitizer (clang, whose
#                               unoptimised builds of these templates compile in half the time GCC's take;
#                               without the examples and the per-instruction-set kernel builds)
#   scripts/test.sh --tsan      the threading tests and the core suite under ThreadSanitizer (clang, without
#                               OpenMP, whose runtime TSan cannot see into)
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev catch2 nlohmann-json3-dev
dir=build/tests
args="-DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_EXAMPLES=ON"
targets=""
select=""
case "${1:-}" in
  --sanitize)
    scripts/ensure-packages.sh clang-14 libclang-rt-14-dev libomp-14-dev
    dir=build/sanitize
    args="-DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++-14 -DLORA_SANITIZE=ON -DLORA_BUILD_EXAMPLES=OFF"
    ;;
  --tsan)
    scripts/ensure-packages.sh clang-14 libclang-rt-14-dev
    dir=build/tsan
    args="-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 -DLORA_SANITIZE_THREAD=ON -DLORA_USE_OPENMP=OFF -DLORA_BUILD_EXAMPLES=OFF"
    targets="--target test_threads test_core"
    select="-R ^(test_threads|test_core):"
    export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
    ;;
esac
# shellcheck disable=SC2086
cmake -S . -B "$dir" $args -DLORA_BUILD_TESTS=ON >/dev/null
# shellcheck disable=SC2086
cmake --build "$dir" -j"$(nproc)" $targets
# shellcheck disable=SC2086
ctest --test-dir "$dir" --output-on-failure -j"$(nproc)" $select
