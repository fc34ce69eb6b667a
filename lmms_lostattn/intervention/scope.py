"""Running an intervention on a live model, scoped by a context manager that leaves nothing attached.

``intervene(model, intervention, adapter)`` composes, for the duration of a ``with`` block:

* a forward pre-hook on the top-level model that tracks the current prompt (:mod:`.prompt`): which key positions
  are visual tokens, where each sample's real tokens start and end, and each sample's identity for the draws;
* for the image priors (``vision_attention``, ``complexity``), a pre-hook on the vision tower and a hook after
  each top-level forward (:mod:`.prior_hooks`);
* for attention-weight modes, the language decoder routed through the ``lostattn`` attention functions
  (:mod:`.kernel`) and the edited layers' attention modules given the edited path (:mod:`.attention`), which works
  on the rows and keys :mod:`.selection` picks once per forward step, with the patterns of :mod:`.patterns`;
* for ``noise_delta`` and ``noise_qkv``, the hooks and weights of :mod:`.noise`;
* with ``on_layer``, the residual recorder of :mod:`lmms_lostattn.statistics.recorder`.

Errors raised inside the model (e.g. ``attn_keys=image`` on a prompt without image tokens) are kept on the scope
as well, because some hosts swallow exceptions from ``generate``: call :meth:`Scope.raise_pending` after each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat.internals import check_model
from lmms_lostattn.config.spec import PRIOR_MODES, Intervention
from lmms_lostattn.families.base import FamilyAdapter
from lmms_lostattn.intervention.attention import EditedAttention
from lmms_lostattn.intervention.kernel import editing, route_attention
from lmms_lostattn.intervention.noise import noise_delta_hook, noise_qkv
from lmms_lostattn.intervention.prior_hooks import prior_hook
from lmms_lostattn.intervention.prompt import InterventionError, PromptState, PromptTracker, RowLayout, SampleIds
from lmms_lostattn.intervention.selection import Selector
from lmms_lostattn.statistics.recorder import record_residuals

__all__ = ["InterventionError", "RowLayout", "PromptState", "Scope", "intervene"]


class Scope:
    """Live state of one :func:`intervene` block: the prompt tracker, the row/key selector and the edited
    attention path of one model, and the first error raised inside the model."""

    def __init__(self, model: nn.Module, intervention: Intervention, adapter: FamilyAdapter) -> None:
        self.model = model
        self.intervention = intervention
        self.adapter = adapter
        self.prompts = PromptTracker(intervention, torch.tensor(adapter.visual_token_ids(model.config)))
        self.selector = Selector(intervention, self.prompts)
        self.attention = EditedAttention(intervention, self.prompts, self.selector)
        self.error: BaseException | None = None

    @property
    def state(self) -> PromptState | None:
        """The tracked prompt."""
        return self.prompts.state

    def set_samples(self, sample_ids: SampleIds) -> None:
        """See :meth:`PromptTracker.set_samples`."""
        self.prompts.set_samples(sample_ids)

    @contextmanager
    def recording_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            self.error = self.error or error
            raise

    def raise_pending(self) -> None:
        """Re-raise an error raised inside the model, in case the caller of ``generate`` swallowed it."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the top-level model."""
        with self.recording_errors():
            self.prompts.track(args, kwargs)

    def attend(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The edited path of one attention call (:meth:`EditedAttention.attend`'s arguments)."""
        with self.recording_errors():
            return self.attention.attend(*args)

    def noise_delta_hook(self, layer: int) -> Callable[..., Any]:
        return noise_delta_hook(layer, self.intervention.sigma, self.prompts, self.selector, self.recording_errors)

    def on_layer(self, on_layer: Callable[..., None]) -> Callable[..., None]:
        """A recorder callback that also gets the tracked prompt, with its errors kept."""

        def recorded(*args: Any) -> None:
            with self.recording_errors():
                on_layer(*args, self.prompts.state)

        return recorded


@contextmanager
def intervene(
    model: nn.Module,
    intervention: Intervention,
    adapter: FamilyAdapter,
    on_layer: Callable[..., None] | None = None,
    image_mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Iterator[Scope]:
    """Apply ``intervention`` to ``model`` inside the block; every hook, weight and setting is restored after.

    ``on_layer(layer, x, d_attn, d_ffn, state)``, if given, receives each decoder layer's residual stream and
    updates on every prefill pass (see :mod:`lmms_lostattn.statistics.recorder`), measured after the intervention
    (e.g. the ``noise_delta`` update), with the :class:`PromptState` that locates padding and image tokens.
    ``image_mean_std``: the image processor's per-channel normalisation, which ``attn=complexity`` undoes to see
    the image the model sees.
    """
    adapter.check_mode(model.config, intervention.mode)
    scope = Scope(model, intervention, adapter)
    layers = adapter.decoder_layers(model)
    edited = {index: adapter.attention_module(layers[index]) for index in intervention.layers}
    check_model(
        model,
        list(edited.values()),
        eager=intervention.edits_weights and model.config.get_text_config()._attn_implementation == "eager",
    )
    with ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(scope.before_forward, with_kwargs=True).remove)
        if intervention.mode in PRIOR_MODES:
            stack.callback(model.register_forward_hook(scope.prompts.after_forward).remove)
            hook = prior_hook(scope.prompts, model, adapter, intervention.mode, image_mean_std, scope.recording_errors)
            stack.callback(hook.remove)
        if intervention.edits_weights:
            stack.enter_context(route_attention(model))
            stack.enter_context(editing(edited, scope.attend))
        elif intervention.mode == "noise_delta":  # on what the layer adds: a sandwich layer's post-attention norm
            for index in intervention.layers:
                update = adapter.update_modules(layers[index])[0]
                stack.callback(update.register_forward_hook(scope.noise_delta_hook(index)).remove)
        elif intervention.mode == "noise_qkv":
            stack.enter_context(noise_qkv(layers, adapter, intervention))
        if on_layer is not None:
            recorded = scope.on_layer(on_layer)
            stack.enter_context(record_residuals(layers, adapter, recorded, lambda: scope.prompts.prefill))
        yield scope
