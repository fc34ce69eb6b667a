"""Prompt tracking: which key positions are visual tokens, where each sample's real tokens start and end, and each
sample's identity for the random draws, through prefill and cached decoding.

A :class:`PromptTracker` sees every top-level forward (its :meth:`~PromptTracker.track` runs in a forward pre-hook):
a forward without a KV cache starts a new prompt (or, without a cache, recomputes the last one grown by the
generated tokens); a cached decoding step grows the tracked prompt by its new positions. The cache is read through
:func:`lmms_lostattn.compat.internals.forward_cache`; a decoding step it cannot place is an error, and so is a cached
forward of several positions (a prompt in chunks, assisted decoding). A generated token is text even where its id is
an image token's: the model embeds it as a token, with no image behind it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmms_lostattn.compat import internals
from lmms_lostattn.compat.versions import drift
from lmms_lostattn.config.spec import Intervention
from lmms_lostattn.intervention import rng


class InterventionError(RuntimeError):
    """The intervention cannot run on this input (the message says why and what is accepted)."""


NO_END = torch.iinfo(torch.int64).max  # a row without right padding: its real tokens run to the end


@dataclass(frozen=True)
class RowLayout:
    """What a host knows about the rows of a prompt it is about to run (one entry per row, or per sample when
    beams repeat each sample): each row's sample name for the draws and, for rows right-padded without an
    attention mask (lm-eval's scoring passes), where its real tokens end (exclusive) and where the continuation it
    scores starts (the position of its first scored token, as ``labels`` would mark it)."""

    names: Sequence[str]
    ends: Sequence[int] | None = None
    continuation_starts: Sequence[int] | None = None


@dataclass
class PromptState:
    """What the tracker knows about the prompt being processed (batch of B samples, T positions so far)."""

    prompt_ids: torch.Tensor  # (B, P) the prompt as first seen, left-padded
    is_visual: torch.Tensor  # (B, T) bool, grows by one column (False: generated) per decoding step
    first_real: torch.Tensor  # (B,) index of each sample's first non-padding token
    real_end: torch.Tensor  # (B,) end (exclusive) of each sample's real tokens; NO_END where it is not right-padded
    sample_key: torch.Tensor  # (B,) int64 keys from (seed, sample identity)
    # per (layer, or SHARED_LAYER for draws shared by all layers; device): its Coordinates.memo
    draws: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = field(default_factory=dict)
    # per device: the mixed head and key coordinates of the draws, the same in every layer (Coordinates.mixed)
    mixed_coordinates: dict[torch.device, dict[Hashable, Any]] = field(default_factory=dict)
    # (B,) first position of the continuation a scoring pass (``labels``) scores; None: generation
    continuation_start: torch.Tensor | None = None
    # image priors: the per-image (N, P) priors the vision tower hooks computed for this prompt, in image order,
    # and, once an edited layer needs it, the (B, prompt length) prior value at each prompt position
    prior_parts: list[torch.Tensor] = field(default_factory=list)
    prior: torch.Tensor | None = None
    right_padded: bool = False  # the host gave row ends (``real_end``): rows may end before the last position

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def length(self) -> int:
        """Positions seen so far (prompt and generated)."""
        return self.is_visual.shape[1]

    def last_rows_from(self) -> torch.Tensor | int:
        """First row ``attn_rows=last`` edits: the row that predicts the first generated or scored token."""
        start = self.prompt_len if self.continuation_start is None else self.continuation_start[:, None]
        return start - 1

    def positions(self, length: int) -> torch.Tensor:
        """Absolute positions of the last ``length`` positions seen so far."""
        return torch.arange(self.length - length, self.length, device=self.is_visual.device)

    def visual_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N) visual flags at absolute positions; positions before the tracked range count as non-visual."""
        return self.is_visual[:, positions.clamp_min(0)] & (positions >= 0)

    def real(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N) whether each position is one of the sample's real (non-padding) tokens."""
        return (positions[None, :] >= self.first_real[:, None]) & (positions[None, :] < self.real_end[:, None])


def _repeated(values: Sequence[Any], batch: int, what: str) -> list[Any]:
    """One value per row of a batch of ``batch`` rows: ``values`` per row, or per sample when each sample is
    repeated (``num_beams`` / ``num_return_sequences``)."""
    if not values or batch % len(values):
        raise InterventionError(f"lostattn: {len(values)} {what} for a batch of {batch}")
    return [value for value in values for _ in range(batch // len(values))]


def _per_row(values: Sequence[int], batch: int, what: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(_repeated(list(values), batch, what), dtype=torch.long, device=device)


def refuse_hidden_cache(position_ids: torch.Tensor | None) -> None:
    """A new prompt starts at position 0; one that starts later continues a KV cache the forward did not name as
    :data:`~lmms_lostattn.compat.internals.KV_CACHE_KWARGS` (taking it for a new prompt would edit the wrong rows)."""
    if position_ids is not None and position_ids.numel() and int(position_ids.min()) > 0:
        raise drift(
            "transformers",
            "the model forward's KV-cache argument",
            f"the cache of a forward at positions >= {int(position_ids.min())} under one of "
            f"{internals.KV_CACHE_KWARGS}, found none",
        )


SampleIds = Sequence[str] | Callable[[int], RowLayout] | None


class PromptTracker:
    """The prompt the model is processing, as its top-level forwards reveal it."""

    def __init__(self, intervention: Intervention, visual_ids: torch.Tensor) -> None:
        self.intervention = intervention
        self.visual_ids = visual_ids
        self.sample_ids: SampleIds = None
        self.state: PromptState | None = None
        self.prefill = False  # True while the forward pass of a new prompt runs
        self.step = 0  # counts forward steps: what is worked out once per step is keyed by it
        self.pending_priors: list[torch.Tensor] = []  # image priors since the last forward ended

    def set_samples(self, sample_ids: SampleIds) -> None:
        """Name the samples of the next prompt (e.g. ``task/split/doc_id``); ``None`` = hash of the prompt tokens. A
        callable describes every new prompt from its number of rows, when it starts (a host that runs its own
        batches: see :class:`lmms_lostattn.model_wrappers.common.batches.HostBatches`)."""
        self.sample_ids = sample_ids
        self.state = None

    def after_forward(self, *_: Any) -> None:
        """A forward ended: image priors computed from now on belong to the next prompt."""
        self.pending_priors = []

    def track(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """A top-level forward starts (called with its arguments)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise InterventionError(
                "lostattn needs input_ids to find the image tokens; inputs_embeds-only calls are not supported"
            )
        cache = internals.forward_cache(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        state = self.state
        self.prefill = False
        self.step += 1
        if cached:
            if state is None or state.is_visual.shape[0] != input_ids.shape[0]:
                raise InterventionError("lostattn: a cached decoding step arrived without its prompt")
            if cached != state.length:
                raise drift(
                    "transformers",
                    "the KV cache given to a decoding step",
                    f"it to hold the {state.length} positions the scope has seen, it holds {cached}",
                )
            if input_ids.shape[1] != 1:
                raise InterventionError(
                    f"lostattn: a cached forward of {input_ids.shape[1]} new positions (a prompt fed in chunks, e.g. "
                    "prefill_chunk_size, or assisted decoding: prompt_lookup_num_tokens, assistant_model) is not "
                    "supported; the plugin tracks one forward of the whole prompt, then one generated token per step"
                )
            state.is_visual = self._generated(state)
        elif cache is None and state is not None and self._recomputes(state, input_ids, kwargs):
            state.is_visual = self._generated(state)
        else:
            refuse_hidden_cache(kwargs.get("position_ids"))
            is_visual = torch.isin(input_ids, self.visual_ids.to(input_ids.device))
            self.state = self._new_prompt(input_ids, is_visual, kwargs.get("attention_mask"), kwargs.get("labels"))
            self.prefill = True

    @staticmethod
    def _generated(state: PromptState) -> torch.Tensor:
        """The visual flags grown by one generated position, which is not visual."""
        new = torch.zeros(state.is_visual.shape[0], 1, dtype=torch.bool, device=state.is_visual.device)
        return torch.cat([state.is_visual, new], dim=1)

    @staticmethod
    def _recomputes(state: PromptState, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """Whether a forward without a cache is a decoding step of ``generate(use_cache=False)``: the whole sequence
        again, one token longer than the last forward, under ``use_cache=False`` and without labels. Any other
        forward starts a prompt, even one that extends the last (a host's next batch, a longer option scored after
        a shorter one)."""
        prompt = state.prompt_ids
        return (
            kwargs.get("use_cache") is False
            and kwargs.get("labels") is None
            and input_ids.shape[0] == prompt.shape[0]
            and input_ids.shape[1] == state.length + 1
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
        :class:`RowLayout` may give it instead, with each row's real end for right-padded rows."""
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            first_real = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                given = (f"a {attention_mask.dim()}-D tensor" if isinstance(attention_mask, torch.Tensor)
                         else f"a {type(attention_mask).__name__}")
                raise InterventionError(
                    f"lostattn: the model was given a prepared attention mask ({given}), as generate() does for "
                    "cache_implementation='static'; lostattn finds each sample's padding in the 2-D (batch, "
                    "positions) padding mask. Generate with the default dynamic cache (or 'hybrid')."
                )
            if not bool(attention_mask[:, -1].all()):
                alone = " or batch size 1" if batch > 1 else ""  # a processor may pad one prompt (to a multiple of 8)
                raise InterventionError(
                    "lostattn needs left padding (padding_side='left'); the batch is right-padded. Generation with a "
                    "decoder-only model needs left padding with or without the plugin: use a tokenizer that pads "
                    f"left (tokenizer.padding_side='left'){alone}"
                )
            first_real = attention_mask.long().argmax(dim=1)
        rows = self.sample_ids(batch) if callable(self.sample_ids) else None
        names = rows.names if rows is not None else self.sample_ids
        real_end = torch.full((batch,), NO_END, dtype=torch.long, device=device)
        if rows is not None and rows.ends is not None:
            real_end = _per_row(rows.ends, batch, "row ends", device)
        inter = self.intervention
        if inter.image_args() and not bool(is_visual.any(dim=1).all()):
            missing = (~is_visual.any(dim=1)).nonzero().flatten().tolist()
            which = (", ".join(_repeated(list(names), batch, "sample ids")[row] for row in missing) if names
                     else f"{missing} of this batch")
            raise InterventionError(
                f"lostattn: attn_keys={inter.keys}, attn_rows={inter.rows} edit image tokens, but sample(s) {which} "
                f"have none (image token ids {self.visual_ids.tolist()}). Use attn_keys=text|all and "
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
            right_padded=rows is not None and rows.ends is not None,
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
