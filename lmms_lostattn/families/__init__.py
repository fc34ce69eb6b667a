"""Architecture adapters: one small declarative file per family, looked up by ``config.model_type`` (a
vision-language model's decoder layers as its language model's family describes them).

Every :class:`FamilyAdapter` defined at the top level of a module of this package is found on first use, so a new
family is one file here (README: 'Adding a family'); :func:`register` adds one defined elsewhere (a third-party
package, a test).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace

from transformers import PretrainedConfig

from lmms_lostattn.families.base import DECODER_FIELDS, FamilyAdapter

# Families whose decoder layers the adapters do not map yet, and why.
UNFIT: dict[str, str] = {
    "mllama": "its gated cross-attention layers attend to vision states, not to image tokens of the sequence",
    "aya_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
    "cohere2_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
    "gpt_oss": "its attention adds learned sinks (s_aux) to every softmax, which the edited path does not model",
}


class UnsupportedFamilyError(ValueError):
    """A checkpoint whose model type no family adapter claims."""


class FamilyRegistry:
    """The known adapters: this package's modules, discovered once, then any :meth:`register`-ed."""

    def __init__(self, package: str) -> None:
        self._package = package
        self._adapters: list[FamilyAdapter] | None = None

    def adapters(self) -> tuple[FamilyAdapter, ...]:
        if self._adapters is None:
            self._adapters = []
            package = importlib.import_module(self._package)
            for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
                module = importlib.import_module(f"{self._package}.{module_info.name}")
                for value in vars(module).values():
                    if isinstance(value, FamilyAdapter):
                        self.register(value)
        return tuple(self._adapters)

    def register(self, adapter: FamilyAdapter) -> None:
        """Add ``adapter``; a model type that another family already claims is an error."""
        known = self.adapters()
        if adapter in known:
            return
        taken = {model_type: other.family for other in known for model_type in other.model_types}
        clashes = sorted(set(adapter.model_types) & set(taken))
        if clashes:
            raise ValueError(
                f"lostattn: family {adapter.family!r} claims model type(s) {', '.join(clashes)} of family "
                f"{taken[clashes[0]]!r}"
            )
        self._adapters.append(adapter)

    def unregister(self, adapter: FamilyAdapter) -> None:
        self._adapters.remove(adapter)

    def adapter_for(self, config: PretrainedConfig) -> FamilyAdapter:
        """The adapter for a model config, or a clear error listing what is supported and how to add a family."""
        for adapter in self.adapters():
            if config.model_type in adapter.model_types:
                return self._on_backbone(adapter, config)
        raise self._unsupported(f"model_type {config.model_type!r}", config.model_type)

    def _unsupported(self, what: str, model_type: str) -> UnsupportedFamilyError:
        """The refusal of ``what``, with the :data:`UNFIT` reason of ``model_type``, what is supported and how to add
        a family."""
        listed = sorted(self.adapters(), key=lambda adapter: not adapter.images)  # vision-language families first
        supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in listed)
        why = f" ({UNFIT[model_type]})" if model_type in UNFIT else ""
        return UnsupportedFamilyError(
            f"lostattn: {what} is not supported{why}. Supported: {supported}. "
            "To add a family, write an adapter file in lmms_lostattn/families/ (see qwen.py); lmms-eval runs it "
            "with lostattn_hf, or add one row to lmms_lostattn/model_wrappers/lmms_eval/wrappers.py for a "
            "dedicated model id (README: 'Adding a family')."
        )

    def _on_backbone(self, adapter: FamilyAdapter, config: PretrainedConfig) -> FamilyAdapter:
        """``adapter`` with the decoder-layer description (:data:`DECODER_FIELDS`) of the family that claims the
        config's language model, where that differs (a LLaVA built on Gemma 2's sandwich-norm layers, or on Phi-3's
        fused q/k/v projection): the statistics, ``noise_delta`` and ``noise_qkv`` read the layers the model has. A
        language model of an :data:`UNFIT` family is refused."""
        text_type = config.get_text_config().model_type
        if text_type in UNFIT and text_type != config.model_type:
            raise self._unsupported(f"model_type {config.model_type!r} with a {text_type!r} language model", text_type)
        backbone = next((other for other in self.adapters() if text_type in other.model_types), None)
        if backbone is None or backbone is adapter:
            return adapter
        described = {name: getattr(backbone, name) for name in DECODER_FIELDS}
        differ = {name: value for name, value in described.items() if value != getattr(adapter, name)}
        return replace(adapter, **differ) if differ else adapter


FAMILIES = FamilyRegistry(__name__)
adapters = FAMILIES.adapters
adapter_for = FAMILIES.adapter_for
register = FAMILIES.register


def text_adapters() -> tuple[FamilyAdapter, ...]:
    """The text-only families (lm-eval's ``lostattn-hf``)."""
    return tuple(adapter for adapter in adapters() if not adapter.images)


__all__ = [
    "FAMILIES",
    "UNFIT",
    "FamilyAdapter",
    "UnsupportedFamilyError",
    "adapter_for",
    "adapters",
    "register",
    "text_adapters",
]
