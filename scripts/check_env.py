"""Fail the install when it pulled in what it must not: a CUDA torch or nvidia-* wheels on a machine
without an NVIDIA GPU, or versions other than the lock's."""

import shutil
import sys
from importlib import metadata

import torch

gpu = shutil.which("nvidia-smi") is not None
nvidia = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].startswith("nvidia-"))
problems = []
if not gpu and torch.version.cuda is not None:
    problems.append(f"torch {torch.__version__} is a CUDA build on a machine without a GPU")
if not gpu and nvidia:
    problems.append(f"nvidia packages installed on a machine without a GPU: {', '.join(nvidia)}")
if problems:
    sys.exit("ssl-study setup: " + "; ".join(problems) + " (install torch==2.13.0 from the CPU wheel first)")
print(f"ssl-study setup: torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'})")
