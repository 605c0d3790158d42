"""`torchrun --standalone --nproc-per-node 2` for the tests: CPU ranks over gloo, one thread each."""

import os
import subprocess
import sys
from pathlib import Path

from mmfast.train.default import default_backbone, default_data
from mmfast.train.default.teacher import default_teacher

REPOSITORY = Path(__file__).parents[2]
TIMEOUT = 600


def torchrun(*args, cwd, succeed: bool = True):
    """Runs `args` under torchrun with 2 ranks; returns the finished process (fails the test on exit != 0,
    or with succeed=False on exit 0)."""
    # The default is built before the ranks start, so they only read it.
    default_teacher(default_data())
    default_backbone()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert (done.returncode == 0) == succeed, done.stderr[-4000:]
    return done
