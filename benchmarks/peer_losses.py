"""colpali-engine's and PyLate's loss modules for tests/test_late_interaction_peers.py and
benchmarks/late_interaction_loss.py, from pinned copies outside mmfast's environment.

Neither can share it: colpali-engine requires torchvision (never installed here) and peft < 0.21,
PyLate pins sentence-transformers 5.3.0 and transformers <= 5.3.0. So `install()` puts pinned copies
in .peer-losses at the checkout's root with `pip install --no-deps --target` (once; a failed install
raises), and `load_colpali_losses()` loads only colpali-engine's real loss files by path,
colpali_engine/utils/maxsim.py and colpali_engine/loss/late_interaction_losses.py, under empty package
shells (the real colpali_engine/__init__.py imports its models, hence transformers and torchvision).
Set COLPALI_SCORES_BACKEND=torch before calling its losses to get its einsum scores.
"""

from __future__ import annotations

import fcntl
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

PEERS = ("colpali-engine==0.3.18", "pylate==1.6.0")
PEER_DIR = Path(__file__).resolve().parent.parent / ".peer-losses"  # beside .venv; in .gitignore


def install(peer_dir: Path = PEER_DIR, packages: tuple[str, ...] = PEERS) -> Path:
    """The pinned packages' site directory, installed there first if it holds other versions or none.
    Locked, so processes that need it at once (pytest-xdist workers) install it one time."""
    peer_dir.mkdir(parents=True, exist_ok=True)
    wanted = " ".join(packages)
    with open(peer_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = peer_dir / ".installed"
        if not marker.exists() or marker.read_text() != wanted:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                            str(peer_dir), *packages], check=True)  # fmt: skip
            marker.write_text(wanted)
    return peer_dir


def load(name: str, path: Path) -> types.ModuleType:
    """The module file at `path`, imported as `name` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shell(name: str, path: Path | None = None, **attributes) -> types.ModuleType:
    """An empty package `name` (its submodules found under `path`), registered in sys.modules."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path else []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load_colpali_losses(site: Path) -> types.ModuleType:
    """colpali_engine.loss.late_interaction_losses (ColbertLoss, ColbertPairwiseCELoss, ...) from `site`."""
    root = site / "colpali_engine"
    for name, sub in (("colpali_engine", ""), ("colpali_engine.utils", "utils"), ("colpali_engine.loss", "loss")):
        shell(name, root / sub)
    load("colpali_engine.utils.maxsim", root / "utils" / "maxsim.py")
    return load("colpali_engine.loss.late_interaction_losses", root / "loss" / "late_interaction_losses.py")
