"""Tiny random-weight models of every supported family (LVLMs and text LLMs), for offline tests.

``build_tiny_model(dir, variant)`` writes a complete ``from_pretrained`` directory (fp32 safetensors weights, a
byte-level BPE tokenizer trained on a built-in corpus with the family's special tokens, image/video processor,
processor and chat template; a text LLM has its tokenizer only) for any of :data:`FAMILY_VARIANTS`: hidden size 64,
4 decoder layers, 4 query / 2 key-value heads, 32 px images (Qwen: 28-112 px). ``tiny_model_dir`` caches one build per
variant. ``build_tokenizer`` (the BPE on :data:`CORPUS`) and ``llava_config_and_processor`` (a LLaVA-1.5-style config
and processor of any size) also build shapes-llava and the benchmark checkpoints. Nothing touches the Hugging Face hub.

Each family is one module of this package declaring ``VARIANTS`` (variant -> ``parts(variant, text_layers)``, which
returns the model class, config and processor) and ``ORDER`` (where its variants come in :data:`FAMILY_VARIANTS`);
they are found by scanning the package, so a new family's tiny model is one new file.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import pkgutil
import shutil
import tempfile
from collections.abc import Callable

from lmms_lostattn.testing.llava import llava_config_and_processor
from lmms_lostattn.testing.text import TEXT_VARIANTS
from lmms_lostattn.testing.tokenizer import CORPUS, build_tokenizer

__all__ = [
    "CORPUS",
    "FAMILY_VARIANTS",
    "TEXT_VARIANTS",
    "build_tiny_model",
    "build_tokenizer",
    "llava_config_and_processor",
    "make_tiny_model",
    "tiny_model_dir",
    "tiny_parts",
]

# Bump whenever the output of ``build_tiny_model`` changes, so cached builds are not reused.
_FACTORY_VERSION = "1"


def _find_variants() -> dict[str, Callable[[str, int], tuple]]:
    """Every tiny model the factory builds, variant -> parts(variant, text_layers): the ``VARIANTS`` of this
    package's modules, by their ``ORDER``."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    parts: dict[str, Callable[[str, int], tuple]] = {}
    owners: dict[str, str] = {}
    for module in sorted((m for m in modules if hasattr(m, "VARIANTS")), key=lambda m: (m.ORDER, m.__name__)):
        for variant, builder in module.VARIANTS.items():
            if variant in parts:
                raise ValueError(f"tiny variant {variant!r} is declared by {owners[variant]} and {module.__name__}")
            parts[variant], owners[variant] = builder, module.__name__
    return parts


_PARTS = _find_variants()
FAMILY_VARIANTS = tuple(_PARTS)


def _check_variant(variant: str) -> None:
    if variant not in _PARTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; expected one of {', '.join(FAMILY_VARIANTS)}")


def tiny_parts(variant: str, text_layers: int = 4) -> tuple:
    """``(model class, config, processor)`` of a tiny variant, to change the config before building (benchmarks)."""
    _check_variant(variant)
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    return _PARTS[variant](variant, text_layers)


def make_tiny_model(variant: str, *, seed: int = 0, text_layers: int = 4):
    """``(model, processor)``: a tiny random-weight float32 model of any :data:`FAMILY_VARIANTS`, in memory, with its
    tokenizer, processor and chat template (for the text LLMs of :data:`TEXT_VARIANTS`, the tokenizer)."""
    import torch

    model_cls, config, processor = tiny_parts(variant, text_layers)
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def build_tiny_model(out_dir: str | os.PathLike, variant: str, *, seed: int = 0, text_layers: int = 4) -> pathlib.Path:
    """Build, save and return the directory of a tiny random-weight model of any :data:`FAMILY_VARIANTS` with its
    tokenizer, processor and chat template (loadable offline with ``from_pretrained``)."""
    model, processor = make_tiny_model(variant, seed=seed, text_layers=text_layers)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _cache_root() -> pathlib.Path:
    env = os.environ.get("LOSTATTN_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "lmms_lostattn"


def tiny_model_dir(variant: str) -> pathlib.Path:
    """Cached build under a cache directory (env LOSTATTN_CACHE or ~/.cache/lmms_lostattn), keyed by variant + a
    version string of the factory; build once, reuse."""
    _check_variant(variant)
    root = _cache_root()
    target = root / f"tiny-{variant}-v{_FACTORY_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_tiny_model(tmp, variant)
        try:
            tmp.rename(target)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
