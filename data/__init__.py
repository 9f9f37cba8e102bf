"""FFCV dataset conversion and multi-view loaders."""
