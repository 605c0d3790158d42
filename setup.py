"""Builds mmfast._C (the C++ CPU kernels in csrc/) when torch is importable at build time.

    pip install --no-build-isolation .        # after `pip install torch`: mmfast._C in the wheel
    pip install .                             # isolated build, no torch: kernels built on first use

Without torch at build time (pip's default isolated build) or with MMFAST_SKIP_CPP=1 the wheel
holds no compiled module; mmfast then builds the csrc/ sources it ships on first use (or falls back
to the pure-PyTorch backend). MAX_JOBS limits ninja's parallel jobs.
"""

import os
import sys
from glob import glob

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmfast"))
from _extension import CXX_FLAGS, LD_FLAGS  # noqa: E402  (one flag list for setup.py and the JIT build)

ext_modules, cmdclass = [], {}
if os.environ.get("MMFAST_SKIP_CPP") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "mmfast: torch is not importable at build time (an isolated build?); the C++ kernels will be built "
            "on first use. To build them now: pip install --no-build-isolation ."
        )
    else:
        ext_modules = [
            CppExtension(
                "mmfast._C",
                sources=sorted(glob("csrc/*.cpp")),
                extra_compile_args=CXX_FLAGS,
                extra_link_args=LD_FLAGS,
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
