"""Run by test_resume.py in a subprocess: `mmfast-train` on the embedded default that SIGKILLs itself
in the middle of a checkpoint save or of a training step, as a preempted job dies.

    python killed_run_worker.py save|step STEP ARG...

save STEP: killed while checkpoint-STEP is being written (the encoder is saved, the optimizer is not).
step STEP: killed inside step STEP, after its backward and before its optimizer update.
"""

import os
import signal
import sys

from mmfast.train.cli import train
from mmfast.train.trainer import EmbeddingTrainer


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    moment, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if moment == "save":
        save_optimizer = EmbeddingTrainer._save_optimizer_and_scheduler

        def save_then_die(self, output_dir):
            save_optimizer(self, output_dir)
            if self.state.global_step == step:
                die()

        EmbeddingTrainer._save_optimizer_and_scheduler = save_then_die
    elif moment == "step":
        training_step = EmbeddingTrainer.training_step

        def step_then_die(self, *args, **kwargs):
            loss = training_step(self, *args, **kwargs)
            if self.state.global_step + 1 == step:
                die()
            return loss

        EmbeddingTrainer.training_step = step_then_die
    else:
        raise SystemExit(f"unknown moment {moment!r}: save or step")
    train(argv)
    raise SystemExit("the run finished: it was meant to be killed")


if __name__ == "__main__":
    main()
