"""transformers' hub kernels: whether a load swaps layers for kernels fetched from the hub, and what a model runs.

From transformers 5.25, ``from_pretrained`` without ``use_kernels`` kernelizes the model unless the environment
variable ``USE_HUB_KERNELS`` is false: on CUDA/ROCm/XPU, RMSNorm, activations and rotary embeddings run kernels
fetched from the hub at load time (attention does not; on the CPU nothing is swapped). The policy here
(README, "Hub kernels"):

* the plugin loads exactly as its base class does: the same ``from_pretrained`` default, switched by the same
  variable, so the plugin and the base class run the same layers on one machine and their results stay comparable;
* every run records what it ran (:func:`kernels_record`: ``use_kernels``, the variable, the kernelized layers);
* a load that would fetch kernels from a hub it cannot reach is refused before the weights load
  (:func:`require_reachable_kernels`), instead of waiting on hub timeouts and falling back layer by layer.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from loguru import logger
from packaging.version import Version

from lmms_lostattn.compat.contacts import ContactPoint, expect
from lmms_lostattn.compat.internals import internal
from lmms_lostattn.compat.versions import UpstreamError, installed

ENV = "USE_HUB_KERNELS"
DEFAULT_ON_FROM = Version("5.25")  # the first transformers whose from_pretrained kernelizes by default
PROBE_TIMEOUT_S = 5.0
FALSE_WORDS = ("false", "0", "no", "off")  # how a variable is turned off (and a use_kernels text meant as off)


class HubKernelsError(UpstreamError):
    """A load would fetch hub kernels, and the hub cannot be reached."""


def _kernelizing_release() -> bool:
    """Whether the installed transformers kernelizes by default (5.25.0rc1 and 5.25.0.dev0 count as 5.25)."""
    return Version(installed("transformers") or "0").release >= DEFAULT_ON_FROM.release


def _kernels_enabled() -> object:
    """transformers' own reading of ``USE_HUB_KERNELS`` (5.25 on)."""
    return internal("transformers.integrations.hub_kernels", "_kernels_enabled")()


def _kernelized(model: Any) -> Any:
    """The ``kernels`` library's listing of what ``model`` runs from the hub (``.layers``, ``.funcs``)."""
    return internal("kernels", "get_kernelized_layers")(model)


def _variable_allows() -> bool:
    """Whether ``USE_HUB_KERNELS`` lets a load kernelize: transformers reads it before ``use_kernels=True`` too (from
    5.25 through its own reader; before, a false value turns the kernel decorators into no-ops)."""
    if _kernelizing_release():
        return bool(_kernels_enabled())
    value = os.environ.get(ENV)
    return value is None or value.strip().lower() not in FALSE_WORDS


def kernels_by_default() -> bool:
    """Whether ``from_pretrained`` without ``use_kernels`` kernelizes: transformers >= 5.25 and ``USE_HUB_KERNELS``
    not false, as transformers itself reads the variable."""
    return _kernelizing_release() and _variable_allows()


def accelerator_load(device: Any = None, device_map: Any = None) -> str | None:
    """The accelerator type (``cuda``, ``xpu``, ...) a host would load its model on, given its ``device`` and
    ``device_map`` arguments; None for a load on the CPU (where no hub kernel applies)."""
    import torch

    if not torch.accelerator.is_available():
        return None
    requested = [str(value) for value in (device, device_map) if value not in (None, "")]
    if requested and all(value.startswith("cpu") for value in requested):
        return None
    return torch.accelerator.current_accelerator().type


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``, which it reads when imported)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_problem(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub (``HF_ENDPOINT``) cannot be reached from here, or None when it answers: a HEAD request through
    huggingface_hub's own HTTP session, which fetches the kernels (so through the same proxies)."""
    from huggingface_hub import constants

    session = internal("huggingface_hub.utils", "get_session")()
    try:
        session.head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # whatever the HTTP client raises for a host it cannot reach
        return f"{constants.ENDPOINT} is unreachable ({type(error).__name__}: {error})"
    return None


def require_reachable_kernels(device: Any = None, device_map: Any = None, use_kernels: Any = None) -> None:
    """Before a load on an accelerator that would kernelize (``use_kernels`` as the host passes it to
    ``from_pretrained``; None: transformers' default): refuse when the hub cannot be reached; in the hub's offline
    mode, warn that kernels missing from the local cache fall back to PyTorch's layers."""
    accelerator = accelerator_load(device, device_map)
    if isinstance(use_kernels, str) and use_kernels.strip().lower() in FALSE_WORDS:
        raise HubKernelsError(
            f"lmms-lostattn: use_kernels={use_kernels!r} turns hub kernels on: from_pretrained tests the value for "
            "truth, and any text is true. Give use_kernels=False (or set USE_HUB_KERNELS=0)."
        )
    kernelizes = kernels_by_default() if use_kernels is None else bool(use_kernels) and _variable_allows()
    if accelerator is None or not kernelizes:
        return
    how = "by default" if use_kernels is None else "with use_kernels=True"
    default = f"transformers {installed('transformers')} loads hub kernels on {accelerator} {how}"
    if hub_offline():
        logger.warning(
            f"lmms-lostattn: {default}; in offline mode (HF_HUB_OFFLINE) kernels missing from the local cache fall "
            f"back to PyTorch's layers (the results record which ran). {ENV}=0 loads PyTorch's layers throughout."
        )
        return
    problem = hub_problem()
    if problem is not None:
        raise HubKernelsError(
            f"lmms-lostattn: {default} (RMSNorm, activations, rotary embeddings), fetched at load time, but {problem}. "
            f"Set {ENV}=0 to load PyTorch's layers (for the base class too: it reads the same variable), or "
            "HF_HUB_OFFLINE=1 to use the kernels in the local cache."
        )


def kernel_layers(model: Any) -> dict[str, int]:
    """How many of ``model``'s modules run each hub kernel (its ``layer_name``), as the ``kernels`` library lists
    them: kernel layers (RMSNorm, activations) and kernelized functions (rotary embeddings); empty when nothing was
    kernelized."""
    if not getattr(model, "use_kernels", False):
        return {}
    kernelized = _kernelized(model)
    found = [*kernelized.layers.values(), *getattr(kernelized, "funcs", {}).values()]
    return dict(sorted(Counter(str(kernel.repo.layer_name) for kernel in found).items()))


def describe_layers(layers: dict[str, int]) -> str:
    """Kernel layers (:func:`kernel_layers`) in one line: ``LigerRMSNorm x65, Silu x32``, or ``none``."""
    return ", ".join(f"{name} x{count}" for name, count in layers.items()) or "none"


def kernels_record(model: Any) -> dict[str, Any]:
    """What a loaded model runs, for the results' environment block: ``use_kernels`` (as loaded), the
    ``USE_HUB_KERNELS`` variable (None: unset) and the kernelized layers (:func:`kernel_layers`)."""
    model = getattr(model, "module", model)  # unwrap a data-parallel wrapper
    return {
        "use_kernels": bool(getattr(model, "use_kernels", False)),
        ENV: os.environ.get(ENV),
        "layers": kernel_layers(model),
    }


def _kernels_switch() -> None:
    if _kernelizing_release():
        found = _kernels_enabled()
        expect(isinstance(found, bool), f"_kernels_enabled() returned {found!r}, not a bool")


def _kernelized_listing() -> None:
    if not _kernelizing_release():
        return
    import torch

    listing = _kernelized(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    for part in ("layers", "funcs"):
        expect(isinstance(getattr(listing, part, None), dict), f"get_kernelized_layers(...).{part} is not a dict")


#: The upstream internals this module reads (transformers >= 5.25 only; nothing to check before)
CONTACT_POINTS: tuple[ContactPoint, ...] = (
    ContactPoint("transformers.integrations.hub_kernels._kernels_enabled", "transformers", _kernels_switch),
    ContactPoint("kernels.get_kernelized_layers: .layers and .funcs", "kernels", _kernelized_listing),
)
