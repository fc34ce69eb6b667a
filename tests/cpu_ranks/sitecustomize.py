"""Test harness for data parallelism on a CPU machine, put on ``PYTHONPATH`` by the tests that need it, with
``CPU_RANKS_HOST`` naming the harness whose ranks run: CPU ranks (gloo) are presented to it as the GPU ranks it
expects.

* ``lmms_eval``: lmms-eval 0.7.3's batching classes (``qwen2_5_vl``, ``gemma3``, ...) accept several processes only
  as FSDP or MULTI_GPU and refuse CPU ranks (MULTI_CPU). CPU ranks are presented to them as MULTI_GPU: the classes
  then call ``accelerator.prepare_model(model, evaluation_mode=True)``, which only moves the model to the rank's
  device (the CPU), so each rank runs exactly as one GPU rank would.
* ``lm_eval``: lm-eval 0.4.13's ``HFLM`` splits the documents over the launcher's ranks only when it counts more
  than one GPU (``models/huggingface.py``: ``gpus = torch.cuda.device_count()``, also on a CPU accelerator). That
  count is the launcher's ``WORLD_SIZE`` here, so CPU ranks split the documents and gather the results as GPU ranks
  would; the model stays on the CPU (``--device cpu``; lm-eval then takes accelerate's device, the CPU, with
  ``ACCELERATE_USE_CPU``).

Either way the ranks' process group ends before the interpreter exits: otherwise gloo's threads may still be running
as the process tears down, which now and then aborts it ("terminate called without an active exception") after the
run itself succeeded.
"""

from __future__ import annotations

import atexit
import os

import torch


def _lmms_eval_ranks() -> None:
    import accelerate
    from accelerate.utils import DistributedType

    def distributed_type(accelerator: accelerate.Accelerator) -> DistributedType:
        kind = accelerator.state.distributed_type
        return DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind

    accelerate.Accelerator.distributed_type = property(distributed_type)


def _lm_eval_ranks() -> None:
    torch.cuda.device_count = lambda: int(os.environ.get("WORLD_SIZE", "0"))
    os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate then sets up CPU ranks (gloo) from the launcher's env


{"lmms_eval": _lmms_eval_ranks, "lm_eval": _lm_eval_ranks}[os.environ["CPU_RANKS_HOST"]]()


@atexit.register
def _leave_the_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
