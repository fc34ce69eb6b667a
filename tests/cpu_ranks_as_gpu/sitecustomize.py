"""Test harness for data parallelism on a CPU machine, put on ``PYTHONPATH`` by the tests that need it.

lmms-eval 0.7.3's batching classes (``qwen2_5_vl``, ``gemma3``, ...) accept several processes only as FSDP or
MULTI_GPU and refuse CPU ranks (gloo, MULTI_CPU). Here CPU ranks are presented to them as MULTI_GPU: the classes
then call ``accelerator.prepare_model(model, evaluation_mode=True)``, which only moves the model to the rank's
device (the CPU), so each rank runs exactly as one GPU rank would.
"""

from __future__ import annotations

import atexit

import accelerate
import torch
from accelerate.utils import DistributedType


def _distributed_type(accelerator: accelerate.Accelerator) -> DistributedType:
    kind = accelerator.state.distributed_type
    return DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind


accelerate.Accelerator.distributed_type = property(_distributed_type)


@atexit.register
def _leave_the_process_group() -> None:
    """End the ranks' process group before the interpreter exits: otherwise gloo's threads may still be running as
    the process tears down, which now and then aborts it ("terminate called without an active exception") after
    the run itself succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
