#!/bin/sh
# Builds and runs finetune_transformer (a character-level BERT pretrained on the words of six languages,
# adapted to six others with LoRA and the other methods; see the top of examples/finetune_transformer.cpp),
# then evaluate_transformer, which reloads the saved base and adapter and must print the same accuracy.
# Installs the Debian packages it needs first, the word lists included. Output: build/finetune_transformer_out.
# Extra arguments go to finetune_transformer (--threads N, --quick).
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev nlohmann-json3-dev \
  wamerican wngerman wfrench wspanish wswedish wpolish witalian wportuguese wdutch wdanish wnorwegian wcatalan
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/release -j"$(nproc)" --target finetune_transformer evaluate_transformer
build/release/examples/finetune_transformer --out build/finetune_transformer_out "$@"
build/release/examples/evaluate_transformer --out build/finetune_transformer_out
