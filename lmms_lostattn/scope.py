"""Running an intervention on a live model, scoped by a context manager that leaves nothing attached.

``intervene(model, intervention, adapter)`` installs, for the duration of a ``with`` block:

* a forward pre-hook on the top-level model that tracks the current prompt: which key positions are visual
  tokens (from ``input_ids`` and the family's image/video token ids, through prefill and cached decoding), where
  each sample's real tokens start (left padding, from the attention mask) and end (right padding without a mask,
  as the host says in :class:`PromptRows`), and each sample's identity for the random draws (the KV cache is read
  through :func:`lmms_lostattn.upstream.forward_cache`; a decoding step it cannot place is an error);
* for the image priors (``vision_attention``, ``complexity``), a pre-hook on the vision tower that computes each
  image's prior when the tower runs, and a hook after each top-level forward that closes the prompt's images;
* for attention-weight modes, the ``lostattn`` attention function on the language decoder only (the vision
  tower keeps its own); layers that are not edited, and rows that are not edited, go straight to the original
  kernel (sdpa or eager), so only the edited rows of edited layers pay for materialised weights (with eager, the
  returned attention weights, e.g. ``output_attentions``, are the edited ones); the edited rows and keys are
  worked out once per forward step for all edited layers, and the ``gaussian`` draws once per prompt and layer
  (or once per prompt, ``attn_draw=shared``); every tensor handed to a layer is on that layer's device;
* for ``noise_delta``, forward hooks on the edited layers' attention modules; for ``noise_qkv``, replaced q/k/v
  weights, restored bit for bit on exit.

Errors raised inside the model (e.g. ``attn_keys=image`` on a prompt without image tokens) are kept on the scope
as well, because some hosts swallow exceptions from ``generate``: call :meth:`Scope.raise_pending` after each one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmms_lostattn import priors, rng, upstream
from lmms_lostattn.adapters import FamilyAdapter
from lmms_lostattn.patterns import SHARED_LAYER, Coordinates, band_heads, edited_weights
from lmms_lostattn.recorder import record_residuals
from lmms_lostattn.spec import PRIOR_MODES, Intervention

AttentionInterface = upstream.internal("transformers", "AttentionInterface")
AttentionMaskInterface = upstream.internal("transformers.masking_utils", "AttentionMaskInterface")
sdpa_mask = upstream.internal("transformers.masking_utils", "sdpa_mask")
eager_mask = upstream.internal("transformers.masking_utils", "eager_mask")
repeat_kv = upstream.internal("transformers.integrations.sdpa_attention", "repeat_kv")
sdpa_attention_forward = upstream.internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")


class InterventionError(RuntimeError):
    """The intervention cannot run on this input (the message says why and what is accepted)."""


NO_END = torch.iinfo(torch.int64).max  # a row without right padding: its real tokens run to the end


@dataclass(frozen=True)
class PromptRows:
    """What a host knows about the rows of a prompt it is about to run (one entry per row, or per sample when
    beams repeat each sample): each row's sample name for the draws and, for rows right-padded without an
    attention mask (lm-eval's scoring passes), where its real tokens end (exclusive) and where the continuation it
    scores starts (the position of its first scored token, as ``labels`` would mark it)."""

    names: Sequence[str]
    ends: Sequence[int] | None = None
    continuation_starts: Sequence[int] | None = None


@dataclass
class PromptState:
    """What the scope knows about the prompt being processed (batch of B samples, T positions so far)."""

    prompt_ids: torch.Tensor  # (B, P) the prompt as first seen, left-padded
    is_visual: torch.Tensor  # (B, T) bool, grows by one column per decoding step
    first_real: torch.Tensor  # (B,) index of each sample's first non-padding token
    real_end: torch.Tensor  # (B,) end (exclusive) of each sample's real tokens; NO_END where it is not right-padded
    sample_key: torch.Tensor  # (B,) int64 keys from (seed, sample identity)
    # per (layer, or SHARED_LAYER for draws shared by all layers; device): its Coordinates.memo
    draws: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = field(default_factory=dict)
    # (B,) first position of the continuation a scoring pass (``labels``) scores; None: generation
    continuation_start: torch.Tensor | None = None
    # image priors: the per-image (N, P) priors the vision tower hooks computed for this prompt, in image order,
    # and, once an edited layer needs it, the (B, prompt length) prior value at each prompt position
    prior_parts: list[torch.Tensor] = field(default_factory=list)
    prior: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def last_rows_from(self) -> torch.Tensor | int:
        """First row ``attn_rows=last`` edits: the row that predicts the first generated or scored token."""
        start = self.prompt_len if self.continuation_start is None else self.continuation_start[:, None]
        return start - 1


def _rows_of(block: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """Rows ``needed`` (``(Qs,)``, or ``(B, Qs)`` per sample) of a ``(B|1, H|1, Q, ...)`` block, along dim 2."""
    if needed.dim() == 1:
        return block[:, :, needed]
    block = block.expand(needed.shape[0], *block.shape[1:])
    index = needed[:, None, :, None].expand(-1, block.shape[1], -1, block.shape[3])
    return block.gather(2, index)


def _set_rows(block: torch.Tensor, needed: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` into rows ``needed`` of a ``(B, H, Q, ...)`` block in place (``needed`` distinct per sample)."""
    if needed.dim() == 1:
        block[:, :, needed] = rows
    else:
        block.scatter_(2, needed[:, None, :, None].expand_as(rows), rows)


@dataclass(frozen=True)
class _Selection:
    """The edited rows and keys of one forward step's ``(Q, K)`` block, the same in every edited layer, on one device
    (a sharded model's layers sit on several)."""

    # the query rows our path computes: None = every row; (Qs,) the same rows of every sample; (B, Qs) each sample's
    # own rows (right-padded scoring batches, where each sample's continuation sits elsewhere): its edited rows in
    # order, then distinct unedited ones up to the batch's largest count
    needed: torch.Tensor | None
    query_abs: torch.Tensor  # (B|1, Qs) absolute positions of those rows
    rows: torch.Tensor  # (B, Qs) bool: edited rows among them
    keys: range  # absolute key positions
    key_abs: torch.Tensor  # (K,) the same as a tensor
    key_visual: torch.Tensor  # (B, K) bool: visual key positions
    key_edited: torch.Tensor  # (B, K) bool: key positions whose weights are replaced
    first_query: int  # absolute position of the first computed row

    def to(self, device: torch.device) -> _Selection:
        moved = {
            name: value.to(device)
            for name, value in vars(self).items()
            if isinstance(value, torch.Tensor) and value.device != device
        }
        return dataclasses.replace(self, **moved) if moved else self


def _repeated(values: Sequence[Any], batch: int, what: str) -> list[Any]:
    """One value per row of a batch of ``batch`` rows: ``values`` per row, or per sample when each sample is
    repeated (``num_beams`` / ``num_return_sequences``)."""
    if not values or batch % len(values):
        raise InterventionError(f"lostattn: {len(values)} {what} for a batch of {batch}")
    return [value for value in values for _ in range(batch // len(values))]


def _per_row(values: Sequence[int], batch: int, what: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(_repeated(list(values), batch, what), dtype=torch.long, device=device)


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
        self.sample_ids: Sequence[str] | Callable[[int], PromptRows] | None = None
        self.state: PromptState | None = None
        self.prefill = False  # True while the forward pass of a new prompt runs
        # this forward step's selections, by (Q, K, device); device None: on the prompt state's device
        self._step: dict[tuple[int, int, torch.device | None], _Selection | None] = {}
        self.error: BaseException | None = None
        self.pending_priors: list[torch.Tensor] = []  # image priors since the last forward ended

    def after_forward(self, *_: Any) -> None:
        """A forward ended: image priors computed from now on belong to the next prompt."""
        self.pending_priors = []

    # -- sample identity and errors -------------------------------------------------------------------------

    def set_samples(self, sample_ids: Sequence[str] | Callable[[int], PromptRows] | None) -> None:
        """Name the samples of the next prompt (e.g. ``task/split/doc_id``); ``None`` = hash of the prompt tokens. A
        callable describes every new prompt from its number of rows, when it starts (a host that runs its own
        batches: see :class:`lmms_lostattn.model_wrappers.rows.RequestRows`)."""
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
        elif cache is None and state is not None and self._continues(state, input_ids):
            state.is_visual = is_visual  # decoding without a KV cache: the whole sequence again (an empty cache
            # starts a prompt, even one that extends the last: the next batch a host runs may)
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
        continuation starts at each sample's first label other than -100, as if it had been generated; a host's
        :class:`PromptRows` may give it instead, with each row's real end for right-padded rows."""
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            first_real = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            if not bool(attention_mask[:, -1].all()):
                raise InterventionError(
                    "lostattn needs left padding (padding_side='left'); the batch is right-padded. Generation with a "
                    "decoder-only model needs left padding with or without the plugin: use a tokenizer that pads "
                    "left (tokenizer.padding_side='left') or batch size 1"
                )
            first_real = attention_mask.long().argmax(dim=1)
        rows = self.sample_ids(batch) if callable(self.sample_ids) else None
        names = rows.names if rows is not None else self.sample_ids
        real_end = torch.full((batch,), NO_END, dtype=torch.long, device=device)
        if rows is not None and rows.ends is not None:
            real_end = _per_row(rows.ends, batch, "row ends", device)
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
        elif rows is not None and rows.continuation_starts is not None:
            continuation_start = _per_row(rows.continuation_starts, batch, "continuation starts", device)
        return PromptState(
            input_ids.clone(),
            is_visual,
            first_real,
            real_end,
            self._sample_keys(input_ids, first_real, real_end, names),
            continuation_start=continuation_start,
            prior_parts=self.pending_priors,  # the vision tower runs just before this forward or inside it
        )

    def _sample_keys(
        self, input_ids: torch.Tensor, first_real: torch.Tensor, real_end: torch.Tensor, names: Sequence[str] | None
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        if names is None:
            names = [
                hashlib.blake2b(row[start:end].cpu().numpy().tobytes(), digest_size=8).hexdigest()
                for row, start, end in zip(input_ids, first_real.tolist(), real_end.tolist(), strict=True)
            ]
        else:
            names = _repeated(names, batch, "sample ids")
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
        real = (query_abs[None, :] >= state.first_real[:, None]) & (query_abs[None, :] < state.real_end[:, None])
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
        real = (key_abs[None, :] >= self.state.first_real[:, None]) & (key_abs[None, :] < self.state.real_end[:, None])
        return visual if keys == "image" else ~visual & real

    def _selection(self, num_q: int, num_k: int, device: torch.device) -> _Selection | None:
        """The edited rows and keys of a ``(Q, K)`` attention block of this step on ``device`` (``None``: no row is
        edited); computed by the first edited layer and reused by the others."""
        if (num_q, num_k, None) not in self._step:
            self._step[num_q, num_k, None] = self._select(num_q, num_k)
        if (num_q, num_k, device) not in self._step:
            plain = self._step[num_q, num_k, None]
            self._step[num_q, num_k, device] = None if plain is None else plain.to(device)
        return self._step[num_q, num_k, device]

    def _select(self, num_q: int, num_k: int) -> _Selection | None:
        query_abs = self._positions(num_q)
        rows = self.edited_rows(query_abs)
        union = rows.any(dim=0).nonzero().flatten()
        if union.numel() == 0:
            return None
        own = int(rows.sum(dim=1).max())
        if own < union.numel():  # each sample's own rows: edited first (stable), then unedited ones
            needed = torch.sort((~rows).to(torch.uint8), dim=1, stable=True).indices[:, :own]
            query_abs, rows = query_abs[needed], rows.gather(1, needed)
        elif union.numel() < num_q:
            needed, query_abs, rows = union, query_abs[union][None, :], rows[:, union]
        else:
            needed, query_abs = None, query_abs[None, :]
        total = self.state.is_visual.shape[1]
        key_abs = self._positions(num_k)
        visual = self._visual_at(key_abs)
        edited = self._edited_keys(key_abs, visual)
        keys = range(total - num_k, total)
        return _Selection(needed, query_abs, rows, keys, key_abs, visual, edited, int(query_abs.min()))

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
        selection = self._selection(query.shape[2], key.shape[2], query.device)
        if selection is None:
            return passthrough(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        needed, out, every_row = selection.needed, None, query
        if needed is not None:
            out, base_weights = passthrough(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            query = _rows_of(query, needed)
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        if kwargs.get("softcap") is not None:
            if self.intervention.scale == "scores":
                raise InterventionError(
                    "lostattn: attn_scale=scores is defined on plain scaled q.k scores; this model soft-caps them "
                    "(softcap). Use attn_scale=none."
                )
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        if mask is not None and out is not None and mask.shape[2] > 1:
            mask = _rows_of(mask, needed)
        allowed = self._allowed(module, mask, selection.query_abs, selection.key_abs)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.float().masked_fill(~allowed, 0.0)  # additive biases beyond the causal mask
        edit = allowed & selection.key_edited[:, None, None, :] & selection.rows[:, None, :, None]
        heads = self.intervention.heads
        if heads.kind == "band":
            sides = self.intervention.head_score == "sides"
            edit = edit & band_heads(scores, allowed, selection.key_visual[:, None, None, :], heads.band, sides)
        elif heads.kind == "indices":
            chosen = torch.zeros(query.shape[1], dtype=torch.bool, device=query.device)
            chosen[list(heads.indices)] = True
            edit = edit & chosen.view(1, -1, 1, 1)
        state, shared, device = self.state, self.intervention.draw == "shared", query.device
        memo = state.draws.setdefault((SHARED_LAYER if shared else layer, device), {})
        sample_key, first_real = state.sample_key.to(device), state.first_real.to(device)
        prior = self._prior_at(selection.keys, device) if self.intervention.mode in PRIOR_MODES else None
        coords = Coordinates(sample_key, first_real, layer, selection.keys, selection.query_abs, memo, shared, prior)
        score_scale = None
        if self.intervention.scale == "scores":
            score_scale = self._score_scale(every_row, key, scaling, scores, allowed, selection)
        weights = edited_weights(scores, allowed, edit, self.intervention, coords, score_scale)
        edited = torch.matmul(weights.to(value.dtype), value).transpose(1, 2)  # (B, Qs, H, Dv)
        if out is None:  # every row edited; the eager kernel also returns the weights (output_attentions)
            return edited.contiguous(), weights.to(query.dtype) if passthrough is _eager_passthrough else None
        changed = edit.any(dim=-1).unsqueeze(-1)  # (B, H, Qs, 1): entries outside stay bitwise
        out = out.transpose(1, 2)  # (B, H, Q, Dv), a view: the writes below land in the kernel's output
        _set_rows(out, needed, torch.where(changed, edited.transpose(1, 2), _rows_of(out, needed)))
        if base_weights is not None:
            _set_rows(base_weights, needed, torch.where(changed, weights.to(base_weights.dtype),
                                                        _rows_of(base_weights, needed)))
        return out.transpose(1, 2), base_weights

    def _score_scale(
        self,
        every_row: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        scores: torch.Tensor,
        allowed: torch.Tensor,
        selection: _Selection,
    ) -> torch.Tensor:
        """|mean(s)| of each computed row ``(B, 1, Qs, 1)`` for ``attn_scale=scores``, as cached generation computes
        it for the sample alone: a prompt row takes the mean of the scaled q.k of the prefill (every head, real row
        and real key of the prompt, before the mask), a generated (or scored) row the mean over its own allowed keys
        (a cached decoding step computes that one row). Recomputation without a cache gives the same values."""
        state, device = self.state, scores.device
        row_keys = allowed.expand_as(scores)
        row_mean = (torch.where(row_keys, scores, 0.0).sum(-1) / row_keys.sum(-1).clamp_min(1)).mean(dim=1)
        last = state.last_rows_from()  # an int while generating: no host sync on a decoding step
        last_max = last if isinstance(last, int) else int(last.max())
        if selection.first_query > last_max:  # generated rows only (a cached decoding step)
            return row_mean.abs()[:, None, :, None]
        row_start = state.is_visual.shape[1] - every_row.shape[2]
        if row_start > 0:
            raise InterventionError(
                "lostattn: attn_scale=scores needs the whole prompt in one forward pass (a chunked prefill starts at "
                f"position {row_start})"
            )
        start = torch.as_tensor(last, device=state.first_real.device).reshape(-1, 1) + 1  # (B|1, 1)
        row_abs = self._positions(every_row.shape[2])
        first = state.first_real[:, None]
        key_abs = self._positions(key.shape[2])
        in_rows = ((row_abs[None, :] >= first) & (row_abs[None, :] < start)).float().to(device)  # (B, Q)
        in_keys = ((key_abs[None, :] >= first) & (key_abs[None, :] < start)).float().to(device)  # (B, K)
        mean_query = (
            torch.einsum("bhqd,bq->bhd", every_row.float(), in_rows) / in_rows.sum(1).clamp_min(1)[:, None, None]
        )
        mean_key = torch.einsum("bhkd,bk->bhd", key.float(), in_keys) / in_keys.sum(1).clamp_min(1)[:, None, None]
        prompt_mean = (mean_query * mean_key).sum(-1).mean(dim=1) * scaling  # (B,): mean over heads, rows, keys
        prompt_rows = selection.query_abs < start.to(device)  # (B, Qs)
        return torch.where(prompt_rows, prompt_mean[:, None], row_mean).abs()[:, None, :, None]

    def _prior_at(self, keys: range, device: torch.device) -> torch.Tensor:
        """``(B, K)`` image-prior values at the block's key positions (0 off the image patches)."""
        state = self.state
        if state.prior is None:
            state.prior = self._map_priors()
        prior = torch.nn.functional.pad(state.prior, (0, max(keys.stop - state.prior.shape[1], 0)))
        return prior[:, keys.start : keys.stop].to(device)

    def _map_priors(self) -> torch.Tensor:
        """The prompt's per-image priors laid on its image tokens: image i of the batch (row-major, as the model
        scatters image features) covers the i-th run of tokens; a leading class token gets no prior mass."""
        state, mode = self.state, self.intervention.mode
        if not state.prior_parts:
            raise InterventionError(
                f"lostattn: attn={mode} needs the vision tower's pass over this prompt's images, and none ran "
                "(image features given precomputed, or no pixel values)"
            )
        priors = torch.cat(state.prior_parts).to(state.is_visual.device)
        visual = state.is_visual[:, : state.prompt_len]
        positions = visual.flatten().nonzero().flatten()
        images, patches = priors.shape
        per_image = positions.numel() // images
        if per_image * images != positions.numel() or per_image not in (patches, patches + 1):
            raise InterventionError(
                f"lostattn: attn={mode}: the prompt has {positions.numel()} image tokens for {images} image(s) of "
                f"{patches} vision patches; it needs {patches} tokens per image ({patches + 1} with the class token)"
            )
        if per_image == patches + 1:
            priors = torch.cat([priors.new_zeros(images, 1), priors], dim=1)
        laid = torch.zeros(visual.numel(), device=priors.device)
        laid[positions] = priors.flatten().float()
        return laid.view(visual.shape)

    @staticmethod
    def _allowed(
        module: nn.Module, mask: torch.Tensor | None, query_abs: torch.Tensor, key_abs: torch.Tensor
    ) -> torch.Tensor:
        """The attention mask of the computed rows (``query_abs``: ``(B|1, Qs)``) as bool ``(B|1, 1|H, Qs, K)``;
        ``None`` means plain causal."""
        if mask is not None:
            return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if not getattr(module, "is_causal", True):
            return torch.ones(1, 1, query_abs.shape[1], key_abs.shape[0], dtype=torch.bool, device=key_abs.device)
        return (key_abs[None, None, :] <= query_abs[:, :, None])[:, None]

    # -- noise_delta ----------------------------------------------------------------------------------------------

    def noise_delta_hook(self, layer: int) -> Callable[..., Any]:
        """Forward hook replacing the attention update of edited rows by Gaussian noise with the same per-token RMS."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            with self.recording_errors():
                delta = output[0] if isinstance(output, tuple) else output
                device = delta.device  # the layer's, which may not be the prompt state's
                positions = self._positions(delta.shape[1])
                rows = self.edited_rows(positions).to(device)
                relative = (positions[None, :] - self.state.first_real[:, None]).to(device)[:, :, None]
                units = torch.arange(delta.shape[-1], device=device).view(1, 1, -1)
                noise = rng.normal(self.state.sample_key.to(device).view(-1, 1, 1), layer, relative, units, 4)
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


def _prior_hook(
    scope: Scope,
    model: nn.Module,
    adapter: FamilyAdapter,
    image_mean_std: tuple[Sequence[float], Sequence[float]] | None,
) -> torch.utils.hooks.RemovableHandle:
    """A hook on the vision tower that computes each image's prior when the tower runs (before the prefill or in
    it) and hands it to the scope; the tower's own kernel and outputs stay as they are."""
    tower, last_attention = adapter.vision_modules(model)

    if scope.intervention.mode == "vision_attention":

        def attention_prior(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            with scope.recording_errors():
                hidden = upstream.forward_input(module, args, kwargs, "hidden_states")
                weights = priors.eager_attention_weights(module, hidden)
                scope.pending_priors.append(priors.vision_attention_prior(weights))

        return last_attention.register_forward_pre_hook(attention_prior, with_kwargs=True)
    if image_mean_std is None:
        raise InterventionError(
            "lostattn: attn=complexity needs the image processor's image_mean and image_std to see the image the "
            "model sees (intervene(..., image_mean_std=(mean, std)))"
        )
    mean, std = (torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) for values in image_mean_std)
    patch = tower.config.patch_size

    def complexity_prior(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        with scope.recording_errors():
            pixels = upstream.forward_input(module, args, kwargs, "pixel_values").float()
            images = pixels * std.to(pixels.device) + mean.to(pixels.device)
            grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
            scope.pending_priors.append(priors.complexity_prior(images, grid))

    return tower.register_forward_pre_hook(complexity_prior, with_kwargs=True)


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
    model: nn.Module,
    intervention: Intervention,
    adapter: FamilyAdapter,
    on_layer: Callable[..., None] | None = None,
    image_mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Iterator[Scope]:
    """Apply ``intervention`` to ``model`` inside the block; every hook, weight and setting is restored after.

    ``on_layer(layer, x, d_attn, d_ffn, state)``, if given, receives each decoder layer's residual stream and
    updates on every prefill pass (see :mod:`lmms_lostattn.recorder`), measured after the intervention (e.g. the
    ``noise_delta`` update), with the :class:`PromptState` that locates padding and image tokens.
    ``image_mean_std``: the image processor's per-channel normalisation, which ``attn=complexity`` undoes to see
    the image the model sees.
    """
    adapter.check_mode(model.config, intervention.mode)
    scope = Scope(model, intervention, adapter)
    layers = adapter.decoder_layers(model)
    upstream.check_model(
        model,
        [adapter.attention_module(layers[index]) for index in intervention.layers],
        eager=intervention.edits_weights and model.config.get_text_config()._attn_implementation == "eager",
    )
    with ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(scope.before_forward, with_kwargs=True).remove)
        if intervention.mode in PRIOR_MODES:
            stack.callback(model.register_forward_hook(scope.after_forward).remove)
            stack.callback(_prior_hook(scope, model, adapter, image_mean_std).remove)
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
