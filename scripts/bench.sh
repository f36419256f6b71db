#!/bin/sh
# Builds the benchmarks (Release; Eigen-only and with LORA_USE_BLAS over Debian's OpenBLAS), runs the
# dense-product comparison (the library's packed GEMM and LoRA layer beside OpenBLAS, BLIS and oneDNN and
# the FMA peak, bench/sgemm_table.py), then the suite and the PyTorch comparison case by case, and prints
# the tables (also in build/bench-results/).
#   scripts/bench.sh            everything: f32 and f64, 1 and 2 threads, sweeps, PyTorch (the suite took 33 min
#                               on an idle 2-core machine; the dense comparison adds about 2 min a round, 3 rounds)
#   scripts/bench.sh --quick    f32 main cases, fewer repetitions, one round of the dense comparison
# Extra arguments go to bench/run.py (see bench/run.py --help).
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev libbenchmark-dev libopenblas-dev libblis-dev libdnnl-dev \
  python3-torch python3-numpy
for variant in eigen blas; do
  blas=OFF
  [ "$variant" = blas ] && blas=ON
  cmake -S . -B "build/bench-$variant" -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_BENCHMARKS=ON -DLORA_USE_BLAS=$blas \
    -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF -DLORA_INSTALL=OFF >/dev/null
  cmake --build "build/bench-$variant" --target bench_lora bench_memory -j"$(nproc)"
done
cmake --build build/bench-eigen --target bench_sgemm bench_sgemm_openblas bench_sgemm_blis bench_sgemm_onednn -j"$(nproc)"
rounds=3
for arg in "$@"; do [ "$arg" = --quick ] && rounds=1; done
mkdir -p build/bench-results
/usr/bin/python3 bench/sgemm_table.py build/bench-eigen/bench "$rounds" --json build/bench-results/sgemm.json \
  >build/bench-results/sgemm.md
cat build/bench-results/sgemm.md
exec /usr/bin/python3 bench/run.py --eigen build/bench-eigen/bench/bench_lora --blas build/bench-blas/bench/bench_lora \
  --memory build/bench-eigen/bench/bench_memory --plot build/bench-results/gflops.svg "$@"
