"""Run by torchrun from test_fsdp_train.py: `mmfast-train` itself with the Trainer's own `--fsdp` and
`--fsdp_config`, on CPU processes over gloo, with one gate of accelerate lifted.

accelerate sets up FSDP only on accelerators: on CPU processes its AcceleratorState takes the run as
MULTI_CPU (DDP) before it looks at the FSDP plugin, and the Trainer would train with DDP (mmfast-train
refuses that: test_fsdp_on_cpu_is_refused). Here, once accelerate has built its state with the Trainer's
FSDP plugin, the distributed type is set to FSDP, as accelerate does on GPUs; everything else is the code
a GPU run goes through: the Trainer's FSDP2 preparation (fully_shard, each backbone layer a unit), its
GradCache steps, its checkpoint save (the full state dict gathered by accelerate; the encoder's own files
and accelerate's FSDP model and optimizer files), resume, and the final save.

    torchrun --standalone --nproc-per-node 2 fsdp_launch_worker.py MMFAST_TRAIN_ARGUMENTS...
"""

import json
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from mmfast.train.cli import train
from mmfast.train.trainer import EmbeddingTrainer

# The Trainer's own FSDP2 options, as accelerate-fsdp.yaml sets them (each backbone layer a unit, full state dict).
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}
FSDP_ARGUMENTS = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", json.dumps(FSDP_CONFIG)]

_state_init = AcceleratorState.__init__
_training_step = EmbeddingTrainer.training_step


def accelerator_state_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    # Later AcceleratorState() calls take the shared state again (MULTI_CPU): lift the gate every time.
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


def fsdp_training_step(self, model, *args, **kwargs):
    if not isinstance(model, FSDPModule):
        raise RuntimeError(f"the step got {type(model).__name__}, not a model sharded by FSDP2")
    return _training_step(self, model, *args, **kwargs)


def lift_accelerate_cpu_gate() -> None:
    """From here on, accelerate sets up FSDP on CPU processes when the Trainer asks for it (and the step checks
    that the model it gets is sharded)."""
    AcceleratorState.__init__ = accelerator_state_with_fsdp_on_cpu
    EmbeddingTrainer.training_step = fsdp_training_step


if __name__ == "__main__":
    lift_accelerate_cpu_gate()
    train(sys.argv[1:])
