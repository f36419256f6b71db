#!/bin/sh
# A training step of finetune_transformer's BERT and of the MiniLM shape, lora.hpp against the same model
# in PyTorch (bench/transformer_step.py; about 9 minutes). Installs what it needs; extra arguments go to
# bench/transformer_step.py (--quick, --rounds N, ...). Tables in build/bench-results/transformer.md.
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev libbenchmark-dev libopenblas-dev python3-torch python3-numpy
cmake -S . -B build/bench-tf -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_BENCHMARKS=ON -DLORA_BUILD_TESTS=OFF \
  -DLORA_BUILD_EXAMPLES=OFF -DLORA_INSTALL=OFF >/dev/null
cmake --build build/bench-tf -j"$(nproc)" --target bench_transformer
exec /usr/bin/python3 bench/transformer_step.py --bin build/bench-tf/bench/bench_transformer "$@"
