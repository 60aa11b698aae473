"""Run a Gazal command under accelerate's FSDP2 on CPU processes (gloo): the test launcher for the
real trainers' FSDP2 path (save, rollback, resume) without GPUs.

accelerate sets DistributedType.FSDP only for GPU-like devices; on CPU processes it keeps MULTI_CPU
and `--use_fsdp` silently runs unsharded. torch's `fully_shard` itself works over gloo, so this shim
lets accelerate take its FSDP branch on CPU (the one thing it changes) and then runs `gazal` as
usual. tests/test_sharding.py asserts the run really was sharded (summary.json `sharding: fsdp2`),
so the test fails if the shim stops taking effect.

Usage: accelerate launch --config_file src/gazal/accelerate/fsdp.yaml --num_processes 2
--mixed_precision no tests/fsdp_cpu.py grpo --config demo ...
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # as accelerate does for its own distributed type: later AcceleratorState() calls copy it back
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from gazal.cli import main

    sys.exit(main(sys.argv[1:]))
