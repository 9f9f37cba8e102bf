#!/usr/bin/env bash
# Installs ssl-study on one cluster node: run by the cluster YAMLs' setup_commands (inside the Ray container
# when docker is used) and by cluster/Dockerfile. Idempotent: `ray up` re-runs it on every update.
#   bash setup_node.sh          every node: FFCV's system packages, the pinned Python packages, ssl-study
#   bash setup_node.sh --head   the same, plus the raw Fashion-MNIST files (only the head converts them)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
export DEBIAN_FRONTEND=noninteractive

# FFCV 1.0.2 is a source distribution: it builds against these (same list as scripts/setup_system.sh).
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends build-essential pkg-config libturbojpeg0-dev libopencv-dev

# torch: the lock pins torch==2.13.0 and torchvision==0.28.0. On the CPU dev machines pip finds a local CPU
# wheel; here, from PyPI, the Linux wheel of that version is the CUDA build, which is what GPU nodes need.
# To pick a CUDA build explicitly, set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128).
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip install -q torch==2.13.0 torchvision==0.28.0 --index-url "$TORCH_INDEX_URL"
fi
pip install -q -r "$REPO/requirements/lock.txt"
pip install -q --no-deps --no-build-isolation -e "$REPO"
python -c "import ffcv, study.spec, trainers"  # fail here, not in the first trial

if [ "${1:-}" = "--head" ]; then
  # The study driver (on the head) converts Fashion-MNIST once into the study's shared data_dir.
  if ! $SUDO apt-get install -y -qq dataset-fashion-mnist; then
    dest=/usr/share/datasets/fashion-mnist
    $SUDO mkdir -p "$dest"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      [ -s "$dest/$f.gz" ] || $SUDO curl -fsSL -o "$dest/$f.gz" \
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/$f.gz"
    done
  fi
fi
