#!/bin/sh
# The package as a user meets it: configure and install with the README's commands, find_package with
# components, and the configure errors for what is missing. One case per run:
#   full               install with lora::io, build and run tests/consumer_full (COMPONENTS io)
#   minimal_deps       configure + install with Catch2 and nlohmann_json hidden: tests and io off, no error;
#                      COMPONENTS io then fails naming nlohmann-json3-dev, OPTIONAL_COMPONENTS io does not
#   missing_component  COMPONENTS nosuch fails naming the component; io without the consumer's nlohmann_json
#   options            asking for tests, io or benchmarks without their packages fails naming the package
# Environment: CMAKE, SOURCE (the library), TESTS (its tests/ folder), WORK (scratch, emptied).
set -eu
case=$1
rm -rf "$WORK" && mkdir -p "$WORK"
status=0
hide_catch2=-DCMAKE_DISABLE_FIND_PACKAGE_Catch2=TRUE
hide_json=-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE
hide_benchmark=-DCMAKE_DISABLE_FIND_PACKAGE_benchmark=TRUE

pass() { echo "ok     $1"; }
fail() {
  echo "FAILED $1"
  status=1
}
# mentions TEXT...: the last log (CMake wraps its messages: lines joined) contains every TEXT.
mentions() {
  joined=$(tr '\n' ' ' <"$WORK/log" | tr -s ' ')
  for text in "$@"; do
    case "$joined" in *"$text"*) ;; *) return 1 ;; esac
  done
}
# succeeds WHAT COMMAND...
succeeds() {
  what=$1
  shift
  if "$@" >"$WORK/log" 2>&1; then pass "$what"; else fail "$what: exit status $?" && cat "$WORK/log"; fi
}
# fails_naming WHAT "TEXT..." COMMAND...: the command fails and its output contains every TEXT (one per line).
fails_naming() {
  what=$1 texts=$2
  shift 2
  if "$@" >"$WORK/log" 2>&1; then
    fail "$what: succeeded" && cat "$WORK/log"
    return
  fi
  old_ifs=$IFS
  IFS='
'
  # shellcheck disable=SC2086
  if mentions $texts; then pass "$what"; else fail "$what: the error does not say: $texts" && cat "$WORK/log"; fi
  IFS=$old_ifs
}
# configure_lora BUILD ARGS...: the README's configure line, in a fresh build folder.
configure_lora() {
  build=$1
  shift
  rm -rf "$build"
  "$CMAKE" -S "$SOURCE" -B "$build" "$@"
}
# probe PREFIX "FIND ARGS" [CMAKE ARGS...]: find_package(lora CONFIG FIND ARGS) in tests/consumer_components.
probe() {
  prefix=$1 find_args=$2
  shift 2
  rm -rf "$WORK/probe"
  "$CMAKE" -S "$TESTS/consumer_components" -B "$WORK/probe" -DCMAKE_PREFIX_PATH="$prefix" \
    "-DLORA_FIND_ARGS=$find_args" "$@"
}
# probe_reports WHAT "PROBE LINE" PREFIX "FIND ARGS" [CMAKE ARGS...]: the probe configures and reports the line.
probe_reports() {
  what=$1 line=$2
  shift 2
  if probe "$@" >"$WORK/log" 2>&1 && mentions "$line"; then pass "$what"; else fail "$what" && cat "$WORK/log"; fi
}

case $case in
  full)
    succeeds "configure lora with -DLORA_IO=ON" configure_lora "$WORK/lora-build" -DLORA_IO=ON
    succeeds "install lora" "$CMAKE" --install "$WORK/lora-build" --prefix "$WORK/prefix"
    succeeds "configure tests/consumer_full (COMPONENTS io)" "$CMAKE" -S "$TESTS/consumer_full" -B "$WORK/build" \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$WORK/prefix"
    succeeds "build tests/consumer_full" "$CMAKE" --build "$WORK/build"
    if "$WORK/build/consumer_full" "$WORK/files"; then pass "run consumer_full"; else fail "run consumer_full"; fi
    ;;
  minimal_deps)
    # The defaults, on a machine with only the library's dependencies (Eigen, OpenMP).
    succeeds "configure lora without Catch2 and nlohmann_json" configure_lora "$WORK/lora-build" "$hide_catch2" "$hide_json"
    if grep -q '^LORA_BUILD_TESTS:BOOL=OFF$' "$WORK/lora-build/CMakeCache.txt"; then
      pass "tests default to OFF without Catch2"
    else
      fail "tests default to OFF without Catch2"
    fi
    succeeds "install lora" "$CMAKE" --install "$WORK/lora-build" --prefix "$WORK/prefix"
    if [ -f "$WORK/prefix/include/lora/lora.hpp" ] && [ -f "$WORK/prefix/share/cmake/lora/lora-config.cmake" ] &&
      [ ! -e "$WORK/prefix/share/cmake/lora/lora-io-targets.cmake" ]; then
      pass "installed: headers and package config, no lora::io"
    else
      fail "installed: headers and package config, no lora::io"
    fi
    probe_reports "find_package(lora REQUIRED): found, no lora::io" "lora_FOUND=1 lora_io_FOUND=FALSE lora::io=no" \
      "$WORK/prefix" "REQUIRED"
    probe_reports "find_package(lora REQUIRED OPTIONAL_COMPONENTS io): found, lora_io_FOUND false" \
      "lora_FOUND=1 lora_io_FOUND=FALSE lora::io=no" "$WORK/prefix" "REQUIRED OPTIONAL_COMPONENTS io"
    fails_naming "find_package(lora REQUIRED COMPONENTS io) on an installation without io" \
      "required component 'io' is missing
nlohmann-json3-dev
-DLORA_IO=ON" probe "$WORK/prefix" "REQUIRED COMPONENTS io"
    ;;
  missing_component)
    succeeds "configure lora" configure_lora "$WORK/lora-build" -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF
    succeeds "install lora" "$CMAKE" --install "$WORK/lora-build" --prefix "$WORK/prefix"
    fails_naming "find_package(lora REQUIRED COMPONENTS io nosuch)" \
      "required component 'nosuch' is missing: no such component; lora's components are: io" \
      probe "$WORK/prefix" "REQUIRED COMPONENTS io nosuch"
    probe_reports "find_package(lora REQUIRED COMPONENTS io OPTIONAL_COMPONENTS nosuch): io found" \
      "lora_FOUND=1 lora_io_FOUND=TRUE lora::io=yes" "$WORK/prefix" "REQUIRED COMPONENTS io OPTIONAL_COMPONENTS nosuch"
    fails_naming "find_package(lora REQUIRED COMPONENTS io) where the consumer has no nlohmann_json" \
      "required component 'io' is missing
nlohmann-json3-dev" probe "$WORK/prefix" "REQUIRED COMPONENTS io" "$hide_json"
    probe_reports "find_package(lora REQUIRED) where the consumer has no nlohmann_json: found, no lora::io" \
      "lora_FOUND=1 lora_io_FOUND=FALSE lora::io=no" "$WORK/prefix" "REQUIRED" "$hide_json"
    ;;
  options)
    fails_naming "-DLORA_BUILD_TESTS=ON without Catch2" "LORA_BUILD_TESTS is ON
install catch2" configure_lora "$WORK/b" -DLORA_BUILD_TESTS=ON "$hide_catch2"
    fails_naming "-DLORA_BUILD_TESTS=ON without nlohmann_json" "LORA_BUILD_TESTS is ON
nlohmann-json3-dev" configure_lora "$WORK/b" -DLORA_BUILD_TESTS=ON "$hide_json"
    fails_naming "-DLORA_BUILD_TESTS=ON -DLORA_IO=OFF" "LORA_IO is OFF" \
      configure_lora "$WORK/b" -DLORA_BUILD_TESTS=ON -DLORA_IO=OFF
    fails_naming "-DLORA_IO=ON without nlohmann_json" "LORA_IO is ON
install nlohmann-json3-dev" configure_lora "$WORK/b" -DLORA_IO=ON -DLORA_BUILD_TESTS=OFF "$hide_json"
    fails_naming "-DLORA_IO=maybe" "LORA_IO must be AUTO, ON or OFF, got 'maybe'" configure_lora "$WORK/b" -DLORA_IO=maybe
    fails_naming "-DLORA_BUILD_BENCHMARKS=ON without Google Benchmark" "LORA_BUILD_BENCHMARKS is ON
install libbenchmark-dev" configure_lora "$WORK/b" -DLORA_BUILD_BENCHMARKS=ON "$hide_benchmark"
    succeeds "-DLORA_IO=OFF: configures" configure_lora "$WORK/b" -DLORA_IO=OFF -DLORA_BUILD_TESTS=OFF
    ;;
  *)
    echo "check_package.sh: unknown case '$case'; expected full, minimal_deps, missing_component or options" >&2
    exit 2
    ;;
esac
exit $status
