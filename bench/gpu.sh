#!/usr/bin/env bash
# The GPU path in one prepared run (about 8 minutes on one H100/H200): the GPU checks, then the training step
# of MoCo v3 at 224 px for ViT-S/16 and ViT-B/16, eager and compiled, bf16, with MFU.
# Needs only torch, timm and pyarrow (no Ray, no FFCV): any Python >= 3.10 with a CUDA torch.
#     bash bench/gpu.sh            # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PYTHON" bench/gpu_checks.py
"$PYTHON" bench/trainer.py --gpu-config --methods moco_v3 --steps 20 \
    --backbones vit_small_patch16_224 vit_base_patch16_224
