"""Architecture adapters: one small declarative file per family, looked up by ``config.model_type``.

Every :class:`FamilyAdapter` defined at the top level of a module of this package is found on first use, so a new
family is one file here (README: 'Adding a family'); :func:`register` adds one defined elsewhere (a third-party
package, a test).
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PretrainedConfig

from lmms_lostattn.families.base import FamilyAdapter

# Families whose decoder layers the adapters do not map yet, and why.
UNFIT: dict[str, str] = {
    "mllama": "its gated cross-attention layers attend to vision states, not to image tokens of the sequence",
    "aya_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
    "cohere2_vision": "its Cohere decoder's parallel attention+MLP blocks are not mapped yet (see gpt_neox.py for how)",
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
                self._check_backbone(adapter, config)
                return adapter
        listed = sorted(self.adapters(), key=lambda adapter: not adapter.images)  # vision-language families first
        supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in listed)
        why = f" ({UNFIT[config.model_type]})" if config.model_type in UNFIT else ""
        raise UnsupportedFamilyError(
            f"lostattn: model_type {config.model_type!r} is not supported{why}. Supported: {supported}. "
            "To add a family, write an adapter file in lmms_lostattn/families/ (see qwen.py); lmms-eval runs it "
            "with lostattn_hf, or add one row to lmms_lostattn/model_wrappers/lmms_eval/wrappers.py for a "
            "dedicated model id (README: 'Adding a family')."
        )

    def _check_backbone(self, adapter: FamilyAdapter, config: PretrainedConfig) -> None:
        """Refuse a language model whose decoder layers add their updates otherwise than the family's adapter says
        (e.g. a LLaVA built on Gemma 2's sandwich-norm layers): the statistics and ``noise_delta`` would read the
        wrong module's output as the update."""
        text_type = config.get_text_config().model_type
        backbone = next((other for other in self.adapters() if text_type in other.model_types), None)
        if backbone is not None and backbone.layer_style != adapter.layer_style:
            raise UnsupportedFamilyError(
                f"lostattn: {config.model_type} with a {text_type} language model is not supported: family "
                f"{adapter.family!r} maps {adapter.layer_style} decoder layers, and {text_type}'s layers are "
                f"{backbone.layer_style} (family {backbone.family!r}). Write an adapter for this combination "
                "(README: 'Adding a family')."
            )


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
