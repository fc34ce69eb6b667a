"""Test harness for lm-eval's data parallelism on a CPU machine, put on ``PYTHONPATH`` by the tests that need it.

lm-eval 0.4.13's ``HFLM`` splits the documents over the launcher's ranks only when it counts more than one GPU
(``models/huggingface.py``: ``gpus = torch.cuda.device_count()``, also on a CPU accelerator). Here that count is the
launcher's ``WORLD_SIZE``, so CPU ranks (gloo) split the documents and gather the results as GPU ranks would; the
model stays on the CPU (``--device cpu``; lm-eval then takes accelerate's device, the CPU, with ``ACCELERATE_USE_CPU``).
"""

from __future__ import annotations

import atexit
import os

import torch

torch.cuda.device_count = lambda: int(os.environ.get("WORLD_SIZE", "0"))
os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate then sets up CPU ranks (gloo) from the launcher's env


@atexit.register
def _leave_the_process_group() -> None:
    """End the ranks' process group before the interpreter exits: otherwise gloo's threads may still be running as
    the process tears down, which now and then aborts it ("terminate called without an active exception") after
    the run itself succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
