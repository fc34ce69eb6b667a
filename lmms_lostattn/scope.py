"""Running an intervention on a live model, scoped by a context manager that leaves nothing attached.

``intervene(model, intervention, adapter)`` installs, for the duration of a ``with`` block:

* a forward pre-hook on the top-level model that tracks the current prompt: which key positions are visual
  tokens (from ``input_ids`` and the family's image/video token ids, through prefill and cached decoding), where
  each sample's first non-padding token is, and each sample's identity for the random draws;
* for attention-weight modes, the ``lostattn`` attention function on the language decoder only (the vision
  tower keeps its own); layers that are not edited, and rows that are not edited, go straight to the original
  kernel (sdpa or eager), so only the edited rows of edited layers pay for materialised weights (with eager, the
  returned attention weights, e.g. ``output_attentions``, are the edited ones); the edited rows and keys are
  worked out once per forward step for all edited layers, and the ``gaussian`` draws once per prompt and layer;
* for ``noise_delta``, forward hooks on the edited layers' attention modules; for ``noise_qkv``, replaced q/k/v
  weights, restored bit for bit on exit.

Errors raised inside the model (e.g. ``attn_keys=image`` on a prompt without image tokens) are kept on the scope
as well, because some hosts swallow exceptions from ``generate``: call :meth:`Scope.raise_pending` after each one.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmms_lostattn import rng, upstream
from lmms_lostattn.adapters import FamilyAdapter
from lmms_lostattn.patterns import Coordinates, band_heads, edited_weights
from lmms_lostattn.recorder import record_residuals
from lmms_lostattn.spec import Intervention

AttentionInterface = upstream.internal("transformers", "AttentionInterface")
AttentionMaskInterface = upstream.internal("transformers.masking_utils", "AttentionMaskInterface")
sdpa_mask = upstream.internal("transformers.masking_utils", "sdpa_mask")
eager_mask = upstream.internal("transformers.masking_utils", "eager_mask")
repeat_kv = upstream.internal("transformers.integrations.sdpa_attention", "repeat_kv")
sdpa_attention_forward = upstream.internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")


class InterventionError(RuntimeError):
    """The intervention cannot run on this input (the message says why and what is accepted)."""


@dataclass
class PromptState:
    """What the scope knows about the prompt being processed (batch of B samples, T positions so far)."""

    prompt_ids: torch.Tensor  # (B, P) the prompt as first seen, left-padded
    is_visual: torch.Tensor  # (B, T) bool, grows by one column per decoding step
    first_real: torch.Tensor  # (B,) index of each sample's first non-padding token
    sample_key: torch.Tensor  # (B,) int64 keys from (seed, sample identity)
    draws: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # per layer: its Coordinates.memo
    # (B,) first position of the continuation a scoring pass (``labels``) scores; None: generation
    continuation_start: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def last_rows_from(self) -> torch.Tensor | int:
        """First row ``attn_rows=last`` edits: the row that predicts the first generated or scored token."""
        start = self.prompt_len if self.continuation_start is None else self.continuation_start[:, None]
        return start - 1


@dataclass(frozen=True)
class _Selection:
    """The edited rows and keys of one forward step's ``(Q, K)`` block, the same in every edited layer."""

    needed: torch.Tensor | None  # the query rows our path computes; None = every row
    query_abs: torch.Tensor  # (Qs,) absolute positions of those rows
    rows: torch.Tensor  # (B, Qs) bool: edited rows among them
    keys: range  # absolute key positions
    key_abs: torch.Tensor  # (K,) the same as a tensor
    key_visual: torch.Tensor  # (B, K) bool: visual key positions
    key_edited: torch.Tensor  # (B, K) bool: key positions whose weights are replaced


def _eager_passthrough(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model file's own eager attention (what transformers runs for ``attn_implementation="eager"``)."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


# Attention implementations we can stand in for: our key -> (original key, pass-through kernel, mask function).
KERNELS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any]]] = {
    "lostattn": ("sdpa", sdpa_attention_forward, sdpa_mask),
    "lostattn_eager": ("eager", _eager_passthrough, eager_mask),
}
_EDITED: dict[int, tuple[Scope, int]] = {}  # id(attention module) -> (active scope, decoder layer index)


def _make_attention(passthrough: Callable[..., Any]) -> Callable[..., Any]:
    def lostattn_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = _EDITED.get(id(module))
        if entry is None:
            return passthrough(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scope, layer = entry
        with scope.recording_errors():
            return scope.attend(passthrough, module, layer, query, key, value, attention_mask, dropout, scaling, kwargs)

    return lostattn_attention


for _name, (_original, _kernel, _mask) in KERNELS.items():
    AttentionInterface.register(_name, _make_attention(_kernel))
    AttentionMaskInterface.register(_name, _mask)


def text_config_key(model: nn.Module) -> str:
    """The sub-config name of the language decoder (``text_config`` for every family seen so far)."""
    config = model.config
    text = config.get_text_config()
    return next((name for name in config.sub_configs if getattr(config, name, None) is text), "")


def _refuse_hidden_cache(position_ids: torch.Tensor | None) -> None:
    """A new prompt starts at position 0; one that starts later continues a KV cache the forward did not name as
    :data:`~lmms_lostattn.upstream.KV_CACHE_KWARGS` (taking it for a new prompt would edit the wrong rows)."""
    if position_ids is not None and position_ids.numel() and int(position_ids.min()) > 0:
        raise upstream.drift(
            "transformers",
            "the model forward's KV-cache argument",
            f"the cache of a forward at positions >= {int(position_ids.min())} under one of "
            f"{upstream.KV_CACHE_KWARGS}, found none",
        )


class Scope:
    """Live state of one :func:`intervene` block."""

    def __init__(self, model: nn.Module, intervention: Intervention, adapter: FamilyAdapter) -> None:
        self.model = model
        self.intervention = intervention
        self.adapter = adapter
        self.visual_ids = torch.tensor(adapter.visual_token_ids(model.config))
        self.sample_ids: Sequence[str] | None = None
        self.state: PromptState | None = None
        self.prefill = False  # True while the forward pass of a new prompt runs
        self._step: dict[tuple[int, int], _Selection | None] = {}  # this forward step's selections, by (Q, K)
        self.error: BaseException | None = None

    # -- sample identity and errors -------------------------------------------------------------------------

    def set_samples(self, sample_ids: Sequence[str] | None) -> None:
        """Name the samples of the next prompt (e.g. ``task/split/doc_id``); ``None`` = hash of the prompt tokens."""
        self.sample_ids = sample_ids
        self.state = None

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

    # -- prompt tracking (forward pre-hook on the top-level model) -----------------------------------------

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        with self.recording_errors():
            self._track(kwargs.get("input_ids", args[0] if args else None), kwargs)

    def _track(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
        if input_ids is None:
            raise InterventionError(
                "lostattn needs input_ids to find the image tokens; inputs_embeds-only calls are not supported"
            )
        is_visual = torch.isin(input_ids, self.visual_ids.to(input_ids.device))
        cache = upstream.forward_cache(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        state = self.state
        self.prefill = False
        self._step = {}
        if cached:
            if state is None or state.is_visual.shape[0] != input_ids.shape[0]:
                raise InterventionError("lostattn: a cached decoding step arrived without its prompt")
            if cached != state.is_visual.shape[1]:
                raise upstream.drift(
                    "transformers",
                    "the KV cache given to a decoding step",
                    f"it to hold the {state.is_visual.shape[1]} positions the scope has seen, it holds {cached}",
                )
            state.is_visual = torch.cat([state.is_visual, is_visual], dim=1)
        elif state is not None and self._continues(state, input_ids):
            state.is_visual = is_visual  # decoding without a KV cache: the whole sequence again
        else:
            _refuse_hidden_cache(kwargs.get("position_ids"))
            self.state = self._new_prompt(input_ids, is_visual, kwargs.get("attention_mask"), kwargs.get("labels"))
            self.prefill = True

    @staticmethod
    def _continues(state: PromptState, input_ids: torch.Tensor) -> bool:
        prompt = state.prompt_ids
        return (
            input_ids.shape[0] == prompt.shape[0]
            and input_ids.shape[1] > prompt.shape[1]
            and bool((input_ids[:, : prompt.shape[1]] == prompt).all())
        )

    def _new_prompt(
        self,
        input_ids: torch.Tensor,
        is_visual: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> PromptState:
        """A new prompt; with ``labels`` (a loglikelihood pass scoring context + continuation in one forward), the
        continuation starts at each sample's first label other than -100, as if it had been generated."""
        batch, length = input_ids.shape
        if attention_mask is None:
            first_real = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        else:
            if not bool(attention_mask[:, -1].all()):
                raise InterventionError("lostattn needs left padding (padding_side='left'); the batch is right-padded")
            first_real = attention_mask.long().argmax(dim=1)
        inter = self.intervention
        if inter.edits_weights and "image" in (inter.keys, inter.rows) and not bool(is_visual.any(dim=1).all()):
            missing = (~is_visual.any(dim=1)).nonzero().flatten().tolist()
            raise InterventionError(
                f"lostattn: attn_keys={inter.keys}, attn_rows={inter.rows} edit image tokens, but sample(s) {missing} "
                f"of this batch have none (image token ids {self.visual_ids.tolist()}). Use attn_keys=text|all and "
                "attn_rows=last|text|all for text-only prompts."
            )
        continuation_start = None
        if labels is not None and labels.shape == input_ids.shape:
            scored = labels != -100
            continuation_start = torch.where(scored.any(dim=1), scored.int().argmax(dim=1), length)
        return PromptState(
            input_ids.clone(),
            is_visual,
            first_real,
            self._sample_keys(input_ids, first_real),
            continuation_start=continuation_start,
        )

    def _sample_keys(self, input_ids: torch.Tensor, first_real: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        if self.sample_ids is None:
            names = [
                hashlib.blake2b(row[start:].cpu().numpy().tobytes(), digest_size=8).hexdigest()
                for row, start in zip(input_ids, first_real.tolist(), strict=True)
            ]
        elif batch % len(self.sample_ids) == 0:  # num_beams / num_return_sequences repeat each sample
            names = [name for name in self.sample_ids for _ in range(batch // len(self.sample_ids))]
        else:
            raise InterventionError(f"lostattn: {len(self.sample_ids)} sample ids for a batch of {batch}")
        keys = [rng.stable_key(self.intervention.seed, name) for name in names]
        return torch.tensor(keys, dtype=torch.int64, device=input_ids.device)

    # -- selections -------------------------------------------------------------------------------------------

    def _positions(self, length: int) -> torch.Tensor:
        """Absolute positions of the last ``length`` positions seen so far."""
        total = self.state.is_visual.shape[1]
        return torch.arange(total - length, total, device=self.state.is_visual.device)

    def _visual_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N) visual flags at absolute positions; positions before the tracked range count as non-visual."""
        flags = self.state.is_visual[:, positions.clamp_min(0)]
        return flags & (positions >= 0)

    def edited_rows(self, query_abs: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool: the query rows the intervention edits (never padding)."""
        state, rows = self.state, self.intervention.rows
        real = query_abs[None, :] >= state.first_real[:, None]
        if rows == "last":
            return real & (query_abs[None, :] >= state.last_rows_from())
        if rows == "all":
            return real
        visual = self._visual_at(query_abs)
        return real & (visual if rows == "image" else ~visual)

    def _edited_keys(self, key_abs: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the key positions whose weights are replaced (``visual``: their visual flags)."""
        keys = self.intervention.keys
        if keys == "all":
            return torch.ones_like(visual)
        return visual if keys == "image" else ~visual & (key_abs[None, :] >= self.state.first_real[:, None])

    def _selection(self, num_q: int, num_k: int) -> _Selection | None:
        """The edited rows and keys of a ``(Q, K)`` attention block of this step (``None``: no row is edited);
        computed by the first edited layer and reused by the others."""
        if (num_q, num_k) not in self._step:
            self._step[num_q, num_k] = self._select(num_q, num_k)
        return self._step[num_q, num_k]

    def _select(self, num_q: int, num_k: int) -> _Selection | None:
        query_abs = self._positions(num_q)
        rows = self.edited_rows(query_abs)
        needed = rows.any(dim=0).nonzero().flatten()
        if needed.numel() == 0:
            return None
        if needed.numel() < num_q:
            query_abs, rows = query_abs[needed], rows[:, needed]
        else:
            needed = None
        total = self.state.is_visual.shape[1]
        key_abs = self._positions(num_k)
        visual = self._visual_at(key_abs)
        edited = self._edited_keys(key_abs, visual)
        return _Selection(needed, query_abs, rows, range(total - num_k, total), key_abs, visual, edited)

    # -- the attention function's edited path ------------------------------------------------------------------

    def attend(
        self,
        passthrough: Callable[..., Any],
        module: nn.Module,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with the edited rows recomputed from materialised, replaced weights."""
        selection = self._selection(query.shape[2], key.shape[2])
        if selection is None:
            return passthrough(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        needed, out = selection.needed, None
        if needed is not None:
            out, base_weights = passthrough(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            query = query[:, :, needed]
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        if kwargs.get("softcap") is not None:
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        if mask is not None and out is not None and mask.shape[2] > 1:
            mask = mask[:, :, needed]
        allowed = self._allowed(module, mask, selection.query_abs, selection.key_abs)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.float().masked_fill(~allowed, 0.0)  # additive biases beyond the causal mask
        edit = allowed & selection.key_edited[:, None, None, :] & selection.rows[:, None, :, None]
        heads = self.intervention.heads
        if heads.kind == "band":
            edit = edit & band_heads(scores, allowed, selection.key_visual[:, None, None, :], heads.band)
        elif heads.kind == "indices":
            chosen = torch.zeros(query.shape[1], dtype=torch.bool, device=query.device)
            chosen[list(heads.indices)] = True
            edit = edit & chosen.view(1, -1, 1, 1)
        state = self.state
        memo = state.draws.setdefault(layer, {})
        coords = Coordinates(state.sample_key, state.first_real, layer, selection.keys, selection.query_abs, memo)
        weights = edited_weights(scores, allowed, edit, self.intervention, coords)
        edited = torch.matmul(weights.to(value.dtype), value).transpose(1, 2)  # (B, Qs, H, Dv)
        if out is None:  # every row edited; the eager kernel also returns the weights (output_attentions)
            return edited.contiguous(), weights.to(query.dtype) if passthrough is _eager_passthrough else None
        changed = edit.any(dim=-1).unsqueeze(-1)  # (B, H, Qs, 1): entries outside stay bitwise
        out[:, needed] = torch.where(changed.transpose(1, 2), edited, out[:, needed])
        if base_weights is not None:
            kept = base_weights[:, :, needed]
            base_weights[:, :, needed] = torch.where(changed, weights.to(base_weights.dtype), kept)
        return out, base_weights

    @staticmethod
    def _allowed(
        module: nn.Module, mask: torch.Tensor | None, query_abs: torch.Tensor, key_abs: torch.Tensor
    ) -> torch.Tensor:
        """The attention mask of the computed rows as bool ``(B|1, 1|H, Qs, K)``; ``None`` means plain causal."""
        if mask is not None:
            return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if not getattr(module, "is_causal", True):
            return torch.ones(1, 1, query_abs.shape[0], key_abs.shape[0], dtype=torch.bool, device=key_abs.device)
        return (key_abs[None, :] <= query_abs[:, None])[None, None]

    # -- noise_delta ----------------------------------------------------------------------------------------------

    def noise_delta_hook(self, layer: int) -> Callable[..., Any]:
        """Forward hook replacing the attention update of edited rows by Gaussian noise with the same per-token RMS."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            with self.recording_errors():
                delta = output[0] if isinstance(output, tuple) else output
                positions = self._positions(delta.shape[1])
                rows = self.edited_rows(positions)
                first = self.state.first_real[:, None, None]
                units = torch.arange(delta.shape[-1], device=delta.device).view(1, 1, -1)
                noise = rng.normal(
                    self.state.sample_key.view(-1, 1, 1), layer, positions.view(1, -1, 1) - first, units, 4
                ).to(delta.device)
                rms = delta.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
                noise = noise * (self.intervention.sigma * rms / noise.pow(2).mean(dim=-1, keepdim=True).sqrt())
                replaced = torch.where(rows[:, :, None], noise.to(delta.dtype), delta)
                return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook


@contextmanager
def _noise_qkv(layers: Sequence[nn.Module], adapter: FamilyAdapter, intervention: Intervention) -> Iterator[None]:
    """Replace q/k/v projection weights of the edited layers by N(mean(W), (sigma*std(W))^2); restore on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for index in intervention.layers:
            attention = adapter.attention_module(layers[index])
            for name in adapter.qkv:
                weight = getattr(attention, name).weight
                saved.append((weight, weight.detach().to("cpu", copy=True)))
                generator = torch.Generator().manual_seed(rng.stable_key(intervention.seed, "noise_qkv", index, name))
                mean, std = weight.float().mean(), weight.float().std()
                draw = torch.randn(weight.shape, generator=generator) * (intervention.sigma * std.cpu()) + mean.cpu()
                with torch.no_grad():
                    weight.copy_(draw.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


@contextmanager
def _attention_implementation(model: nn.Module) -> Iterator[None]:
    """Route the language decoder (only) through ``lostattn``; restore the original implementation on exit."""
    text_key = text_config_key(model)
    original = model.config.get_text_config()._attn_implementation or "sdpa"
    ours = next((name for name, (orig, _, _) in KERNELS.items() if orig == original), None)
    if ours is None:
        accepted = ", ".join(orig for orig, _, _ in KERNELS.values())
        raise InterventionError(
            f"lostattn: attention interventions need the language model on one of {accepted}; "
            f"it uses attn_implementation={original!r}"
        )
    model.set_attn_implementation({text_key: ours})
    routed = model.config.get_text_config()._attn_implementation
    if routed != ours:
        model.set_attn_implementation({text_key: original})
        raise upstream.drift(
            "transformers",
            "PreTrainedModel.set_attn_implementation",
            f"set_attn_implementation({{{text_key!r}: {ours!r}}}) to route the language model, it uses {routed!r}",
        )
    try:
        yield
    finally:
        model.set_attn_implementation({text_key: original})


@contextmanager
def intervene(
    model: nn.Module, intervention: Intervention, adapter: FamilyAdapter, on_layer: Callable[..., None] | None = None
) -> Iterator[Scope]:
    """Apply ``intervention`` to ``model`` inside the block; every hook, weight and setting is restored after.

    ``on_layer(layer, x, d_attn, d_ffn, state)``, if given, receives each decoder layer's residual stream and
    updates on every prefill pass (see :mod:`lmms_lostattn.recorder`), measured after the intervention (e.g. the
    ``noise_delta`` update), with the :class:`PromptState` that locates padding and image tokens.
    """
    scope = Scope(model, intervention, adapter)
    layers = adapter.decoder_layers(model)
    upstream.check_model(
        model,
        [adapter.attention_module(layers[index]) for index in intervention.layers],
        eager=intervention.edits_weights and model.config.get_text_config()._attn_implementation == "eager",
    )
    with ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(scope.before_forward, with_kwargs=True).remove)
        if intervention.edits_weights:
            stack.enter_context(_attention_implementation(model))
            for index in intervention.layers:
                key = id(adapter.attention_module(layers[index]))
                _EDITED[key] = (scope, index)
                stack.callback(_EDITED.pop, key, None)
        elif intervention.mode == "noise_delta":
            for index in intervention.layers:
                hook = scope.noise_delta_hook(index)
                stack.callback(adapter.attention_module(layers[index]).register_forward_hook(hook).remove)
        elif intervention.mode == "noise_qkv":
            stack.enter_context(_noise_qkv(layers, adapter, intervention))
        if on_layer is not None:

            def recorded(*args: Any) -> None:
                with scope.recording_errors():
                    on_layer(*args, scope.state)

            stack.enter_context(record_residuals(layers, adapter, recorded, lambda: scope.prefill))
        yield scope
