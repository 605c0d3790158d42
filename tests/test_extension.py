"""How mmfast finds its C++ kernels: the built module, else a JIT build, else the torch backend.

Each case runs in a fresh interpreter so the import machinery starts clean.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

USE_LOSS = """
import warnings, torch, mmfast
from mmfast.backends import resolve_backend
q, t = torch.randn(5, 8), torch.randn(5, 8)
expected = mmfast.contrastive_loss(q, t, backend="reference")
torch.testing.assert_close(mmfast.contrastive_loss(q, t), expected)
print("auto ->", resolve_backend("auto", q.device))
"""


# As if setup.py had not built mmfast._C: importing it raises ImportError.
HIDE_BUILT_MODULE = 'import sys\nsys.modules["mmfast._C"] = None\n'


def run_python(code: str, tmp_path, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), **env_overrides}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_disabled_cpp_falls_back_to_torch_and_import_never_fails(tmp_path):
    run = run_python(USE_LOSS + "\ntry:\n    mmfast.contrastive_loss(q, t, backend='cpu')\nexcept ValueError as e:\n"
                     "    print('cpu:', e)\n", tmp_path, MMFAST_DISABLE_CPP="1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "auto -> torch" in run.stdout
    assert "backend='cpu' is unavailable: the C++ kernels could not be built" in run.stdout


@pytest.mark.slow
def test_missing_module_is_built_on_first_use_and_said_once(tmp_path):
    check_cache = (
        "from mmfast._extension import load_extension\n"
        "assert load_extension() is load_extension()\n"
        "print('module', load_extension().__name__)\n"
    )
    run = run_python(HIDE_BUILT_MODULE + USE_LOSS + check_cache, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "auto -> cpu" in run.stdout and "module mmfast_C" in run.stdout
    assert run.stderr.count("building them from csrc/ now") == 1


@pytest.mark.slow
def test_no_compiler_warns_once_and_serves_with_torch(tmp_path):
    no_compiler_path = os.environ["PATH"].replace("/usr/bin", "/nonexistent")
    run = run_python(HIDE_BUILT_MODULE + USE_LOSS, tmp_path, CXX="/nonexistent/c++", PATH=no_compiler_path)
    assert run.returncode == 0, run.stderr
    assert "auto -> torch" in run.stdout
    assert run.stderr.count("could not build the CPU kernels") == 1
