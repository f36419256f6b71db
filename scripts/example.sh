#!/bin/sh
# Builds and runs the main example, finetune_classifier. Installs the Debian packages it needs first.
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/release -j"$(nproc)" --target finetune_classifier
build/release/examples/finetune_classifier
