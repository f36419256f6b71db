#!/bin/sh
# Builds and runs the main example, finetune_classifier (it saves its base and adapter under
# build/finetune_classifier_out), and builds evaluate_adapter, which reloads them:
#   build/release/examples/evaluate_adapter --out build/finetune_classifier_out
# Installs the Debian packages it needs first. Extra arguments go to finetune_classifier.
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev nlohmann-json3-dev
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/release -j"$(nproc)" --target finetune_classifier evaluate_adapter
build/release/examples/finetune_classifier --out build/finetune_classifier_out "$@"
