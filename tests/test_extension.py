"""How mmfast finds its C++ kernels: the built module, else a first-use build (from a checkout or an
installed wheel), else the torch backend.

Each case runs in a fresh interpreter so the import machinery starts clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mmfast._extension import source_dir, sources

ROOT = Path(__file__).resolve().parent.parent
USE_LOSS = """
import warnings, torch, mmfast
from mmfast.backends import resolve_backend
q, t = torch.randn(5, 8), torch.randn(5, 8)
expected = mmfast.contrastive_loss(q, t, backend="reference")
torch.testing.assert_close(mmfast.contrastive_loss(q, t), expected)
print("auto ->", resolve_backend("auto", q.device))
"""


# As if mmfast._C had been built against another torch: importing it fails (undefined symbols).
BREAK_BUILT_MODULE = """
import pathlib, tempfile, mmfast
broken = tempfile.mkdtemp()
pathlib.Path(broken, "_C.py").write_text("raise ImportError('_C.so: undefined symbol: _ZN3c10')")
mmfast.__path__.insert(0, broken)
"""
REPORT_STATUS = """
from mmfast._extension import extension_status, load_extension
assert load_extension() is load_extension()
print("module", getattr(load_extension(), "__name__", None))
print("status", extension_status())
"""


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


def test_a_checkout_finds_its_sources_beside_the_package():
    assert source_dir() == ROOT / "csrc" and {Path(p).name for p in sources()} >= {"module.cpp"}


@pytest.mark.slow
def test_a_module_that_fails_to_load_and_no_compiler_warn_once_and_serve_with_torch(tmp_path):
    no_compiler_path = os.environ["PATH"].replace("/usr/bin", "/nonexistent")
    code = BREAK_BUILT_MODULE + USE_LOSS + REPORT_STATUS
    run = run_python(code, tmp_path, CXX="/nonexistent/c++", PATH=no_compiler_path)
    assert run.returncode == 0, run.stderr
    assert "auto -> torch" in run.stdout and "module None" in run.stdout
    assert "status not loaded: mmfast._C could not be loaded (_C.so: undefined symbol: _ZN3c10); " in run.stdout
    assert "the first-use build failed" in run.stdout
    assert run.stderr.count("could not be loaded (_C.so: undefined symbol: _ZN3c10); building it from csrc/") == 1
    assert run.stderr.count("could not build the CPU kernels") == 1


# What `pip install .` gives without torch at build time (an isolated build): MMFAST_SKIP_CPP=1 takes
# the same path in setup.py, without pip fetching setuptools into an isolated environment.
PACKAGE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mmfast", "kernels", "csrc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built, without the compiled module, from a copy of the package's files only."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in PACKAGE_FILES:
        source, copy = ROOT / name, tmp / "src" / name
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            copy.parent.mkdir(exist_ok=True)
            shutil.copy(source, copy)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "-q",
        "-w",
        str(tmp),
        str(tmp / "src"),
    ]
    run = subprocess.run(command, cwd=tmp, env={**os.environ, "MMFAST_SKIP_CPP": "1"}, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (built,) = tmp.glob("mmfast-*.whl")
    return built


def test_wheel_ships_the_cpp_sources_and_no_triton_dependency(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {n.removeprefix("mmfast/csrc/") for n in names if n.startswith("mmfast/csrc/")}
    assert shipped == {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert not [n for n in names if n.endswith(".so")]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    hard = [line for line in requires if "extra ==" not in line]
    assert not [line for line in hard if "triton" in line], hard
    assert [line for line in requires if "triton" in line and 'extra == "triton"' in line], requires


@pytest.mark.slow
def test_installed_wheel_builds_and_loads_the_kernels_on_first_use(wheel, tmp_path):
    """In a fresh venv that sees this environment's torch (like --system-site-packages), far from the
    checkout: the first use compiles the sources the wheel ships, and "auto" runs them."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, numpy, ninja
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", wheel]
    run = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    code = USE_LOSS + REPORT_STATUS + "print('from', mmfast.__file__)\nmmfast.show_config()\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "VIRTUAL_ENV")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    run = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    assert f"from {site}/mmfast/__init__.py" in run.stdout
    assert "auto -> cpu" in run.stdout and "module mmfast_C" in run.stdout
    assert f"status loaded: built on first use from {site}/mmfast/csrc" in run.stdout
    assert run.stderr.count("is missing (not built at install); building it from csrc/ now") == 1, run.stderr
    again = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "status loaded: built on first use" in again.stdout, again.stderr
    assert "building it from csrc/" not in again.stderr  # the cached build loads without a word
