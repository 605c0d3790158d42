"""mmfast.show_config() and `python -m mmfast`: versions, the C++ kernels' state, what "auto" picks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

import mmfast
from mmfast._extension import load_extension


def report(text: str) -> dict[str, str]:
    """The report's "name   value" lines as a dict."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())


def test_show_config_reports_versions_kernels_and_auto(capsys):
    mmfast.show_config()
    rows = report(capsys.readouterr().out)
    assert rows["mmfast"].startswith(f"{mmfast.__version__} (")
    assert rows["torch"].startswith(f"{torch.__version__} (")
    assert rows["triton"]  # a version here (the test extra installs it), else how to get it
    loaded = load_extension() is not None
    assert rows["C++ kernels"].startswith("loaded: " if loaded else "not loaded: ")
    assert rows['"auto" on cpu'] == ("cpu (the C++ kernels)" if loaded else
                                     "torch (chunked PyTorch: the C++ kernels are not loaded)")  # fmt: skip
    assert rows["TRITON_INTERPRET"] == "1"  # set by conftest: variables that change what runs are listed
    assert ('"auto" on cuda:0' in rows) == torch.cuda.is_available()


def test_python_m_mmfast_says_why_the_kernels_are_not_loaded():
    env = {**os.environ, "MMFAST_DISABLE_CPP": "1"}
    run = subprocess.run([sys.executable, "-m", "mmfast"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = report(run.stdout)
    assert rows["C++ kernels"] == "not loaded: disabled by MMFAST_DISABLE_CPP=1"
    assert rows['"auto" on cpu'] == "torch (chunked PyTorch: the C++ kernels are not loaded)"
    assert rows["MMFAST_DISABLE_CPP"] == "1"
