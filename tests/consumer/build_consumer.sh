#!/bin/sh
# Builds and runs tests/consumer against the library consumed one way: find_package on an installed
# prefix, add_subdirectory, or FetchContent from a local path. Environment: CMAKE, SOURCE, WORK, CONSUMER.
set -eu
mode=$1
rm -rf "$WORK" && mkdir -p "$WORK"
if [ "$mode" = find_package ]; then
  "$CMAKE" -S "$SOURCE" -B "$WORK/lora-build" -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF \
    -DCMAKE_INSTALL_PREFIX="$WORK/prefix" >/dev/null
  "$CMAKE" --install "$WORK/lora-build" >/dev/null
  "$CMAKE" -S "$CONSUMER" -B "$WORK/build" -DLORA_CONSUME=find_package -DCMAKE_PREFIX_PATH="$WORK/prefix"
else
  "$CMAKE" -S "$CONSUMER" -B "$WORK/build" -DLORA_CONSUME="$mode" -DLORA_SOURCE_DIR="$SOURCE"
fi
"$CMAKE" --build "$WORK/build"
"$WORK/build/consumer"
