"""Glue between nbdev notebooks and nbval.

nbval knows nothing of nbdev's cell directives, and nbdev-clean drops execution counts,
so this file teaches nbval both before any notebook runs.
"""
import os
import re
import sys

import pytest

# Each pytest-xdist worker runs its own kernels: one thread each keeps 2 workers on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENLLM_EDU_PROFILE", "ci")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests never reach the Hugging Face hub: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_SKIP_DIRECTIVE = re.compile(r"^\s*#\|\s*(eval:\s*false|notest)\s*$", re.MULTILINE)
# Chapter 14 checks its exports against transformers 5, ONNX Runtime and gguf: the `export` extra, which needs
# Python 3.11.
_NEEDS_PY311 = ("14_export.ipynb", "14b_onnx.ipynb", "14c_gguf.ipynb")


def pytest_collection_modifyitems(config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None:  # not a notebook cell
            continue
        if sys.version_info < (3, 11) and item.path.name in _NEEDS_PY311:
            item.add_marker(pytest.mark.skip(reason="the export extra (transformers 5, onnxruntime, gguf) needs Python 3.11"))
        if _SKIP_DIRECTIVE.search(cell.source):
            item.options["skip"] = True
        if cell.execution_count is None and cell.get("outputs"):
            cell.execution_count = 1  # nbdev-clean removed it; the outputs are real
