"""``lostattn_hf``: any image-text-to-text model with a lostattn adapter through lmms-eval's generic ``huggingface``.

lmms-eval 0.7.3's chat class ``huggingface`` does not run on transformers 5.x, for two reasons:

* it picks the model class with ``config.model_type in AutoModelFor*._model_mapping.keys()``, but those keys are
  config classes, never strings, so it always falls back to ``AutoModel``: the bare ``*Model`` without the LM head
  (its ``lm_head`` weights are dropped), which cannot ``generate``;
* it calls the processor with ``images=``, ``videos=`` and ``audios=`` lists, empty when a prompt has none of that
  medium: transformers 5 rejects ``audios`` (renamed ``audio``) and fails on empty ``images``/``videos`` lists.

:class:`HuggingfaceImageTextToText` fixes exactly these two steps and leaves every other line of the base class
(prompting, batching, generation arguments, bfloat16 loading) as it is; ``lostattn_hf`` (a row of
:mod:`.wrappers`) adds the lostattn arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lmms_eval.models.chat.huggingface as lmms_eval_huggingface
from lmms_eval.models.chat.huggingface import Huggingface
from transformers import AutoModelForImageTextToText

_DEFAULT_PRETRAINED = inspect.signature(Huggingface.__init__).parameters["pretrained"].default
_MEDIA_ARGUMENTS = {"images": "images", "videos": "videos", "audios": "audio"}  # lmms-eval's name -> processor's


@contextmanager
def _fallback_model_class(model_class: type) -> Iterator[None]:
    """Make the base class's ``AutoModel`` fallback (the branch it always takes, see above) ``model_class``."""
    fallback = lmms_eval_huggingface.AutoModel
    lmms_eval_huggingface.AutoModel = model_class
    try:
        yield
    finally:
        lmms_eval_huggingface.AutoModel = fallback


class MediaArgumentsProcessor:
    """A processor that is given only the media a prompt has, under transformers 5's argument names."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, **kwargs: Any) -> Any:
        for name, accepted in _MEDIA_ARGUMENTS.items():
            media = kwargs.pop(name, None)
            if media:
                kwargs[accepted] = media
        return self.processor(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


class HuggingfaceImageTextToText(Huggingface):
    """lmms-eval's chat ``huggingface`` loading ``AutoModelForImageTextToText`` and passing the processor only the
    media it is given (the base class with its two transformers-5 failures fixed, nothing else)."""

    def __init__(self, pretrained: str = _DEFAULT_PRETRAINED, **kwargs: Any) -> None:
        with _fallback_model_class(AutoModelForImageTextToText):
            super().__init__(pretrained=pretrained, **kwargs)
        self.processor = MediaArgumentsProcessor(self.processor)

