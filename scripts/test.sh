#!/bin/sh
# Builds and runs all tests. Installs the Debian packages it needs first.
#   scripts/test.sh             Release build, every test
#   scripts/test.sh --sanitize  the same suite under AddressSanitizer + UndefinedBehaviorSanitizer
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev catch2 nlohmann-json3-dev
dir=build/tests
args="-DCMAKE_BUILD_TYPE=Release"
if [ "${1:-}" = "--sanitize" ]; then
  dir=build/sanitize
  args="-DCMAKE_BUILD_TYPE=Debug -DLORA_SANITIZE=ON"
fi
# shellcheck disable=SC2086
cmake -S . -B "$dir" $args -DLORA_BUILD_TESTS=ON -DLORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$dir" -j"$(nproc)"
ctest --test-dir "$dir" --output-on-failure -j"$(nproc)"
