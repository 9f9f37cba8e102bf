"""FFCV dataset conversion and multi-view loaders."""

from data.ffcv_import import install as _install_ffcv_import

_install_ffcv_import()  # before any FFCV import: see data/ffcv_import.py
