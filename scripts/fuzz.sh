#!/bin/sh
# Builds the libFuzzer target fuzz/fuzz_safetensors.cpp with clang (ASan + UBSan) and runs it for a
# bounded time on the seed corpus in fuzz/corpus (new inputs go to build/fuzz/corpus, findings to
# build/fuzz/). Fails if the fuzzer finds a crash, a sanitizer report, a leak, a timeout or an
# out-of-memory. Installs the Debian packages it needs first.
#   scripts/fuzz.sh            60 seconds
#   scripts/fuzz.sh 600        10 minutes
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-60}
scripts/ensure-packages.sh clang-14 libclang-rt-14-dev libeigen3-dev nlohmann-json3-dev
out=build/fuzz
mkdir -p "$out/corpus"
if [ ! -x "$out/fuzz_safetensors" ] || [ -n "$(find include fuzz -newer "$out/fuzz_safetensors" -type f | head -n 1)" ]; then
  echo "Building $out/fuzz_safetensors"
  clang++-14 -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -fno-omit-frame-pointer -Iinclude -I/usr/include/eigen3 fuzz/fuzz_safetensors.cpp -o "$out/fuzz_safetensors"
fi
echo "Fuzzing for $seconds s"
"$out/fuzz_safetensors" -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
  -dict=fuzz/safetensors.dict -artifact_prefix="$out/" -print_final_stats=1 "$out/corpus" fuzz/corpus
