"""Which rows and keys of an attention block an intervention edits, worked out once per forward step.

Every edited layer of a forward step sees the same ``(Q, K)`` block, so :class:`Selector` computes the
:class:`Selection` once (with the first edited layer) and hands each later layer the same one, moved to that
layer's device (a sharded model's layers sit on several). For ``attn_rows=last`` while generating, the rows follow
from positions the host knows (every row from the one that predicts the first generated token), so a decoding step
selects without reading anything back from the device; right-padded scoring rows are found per sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lmms_lostattn.config.spec import Intervention
from lmms_lostattn.intervention.prompt import PromptTracker


@dataclass(frozen=True)
class Selection:
    """The edited rows and keys of one forward step's ``(Q, K)`` block, on one device."""

    # the query rows the edited path computes: None = every row; (Qs,) the same rows of every sample; (B, Qs) each
    # sample's own rows (right-padded scoring batches, where each sample's continuation sits elsewhere): its edited
    # rows in order, then distinct unedited ones up to the batch's largest count
    needed: torch.Tensor | None
    query_abs: torch.Tensor  # (B|1, Qs) absolute positions of those rows
    rows: torch.Tensor  # (B, Qs) bool: edited rows among them
    key_abs: torch.Tensor  # (K,) absolute key positions (contiguous)
    key_visual: torch.Tensor  # (B, K) bool: visual key positions
    key_edited: torch.Tensor  # (B, K) bool: key positions whose weights are replaced
    first_query: int  # absolute position of the first computed row
    first_key: int  # absolute position of the first key
    # what the edited layers of the step share, by attention mask (see EditedAttention); one per device
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def keys(self) -> range:
        """The absolute key positions as a range (no host sync)."""
        return range(self.first_key, self.first_key + self.key_abs.shape[0])

    def to(self, device: torch.device) -> Selection:
        moved = {
            name: value.to(device)
            for name, value in vars(self).items()
            if isinstance(value, torch.Tensor) and value.device != device
        }
        return dataclasses.replace(self, **moved) if moved else self


Rows = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]  # Selection's needed, query_abs, rows, first_query


class Selector:
    """The edited rows and keys of the tracked prompt's forward steps (``attn_rows``, ``attn_keys``)."""

    def __init__(self, intervention: Intervention, prompts: PromptTracker) -> None:
        self.intervention = intervention
        self.prompts = prompts
        self._step = -1
        # this forward step's selections, by (Q, K, device); device None: on the prompt state's device
        self._memo: dict[tuple[int, int, torch.device | None], Selection | None] = {}

    def edited_rows(self, query_abs: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool: the query rows the intervention edits (never padding)."""
        state, rows = self.prompts.state, self.intervention.rows
        real = state.real(query_abs)
        if rows == "last":
            return real & (query_abs[None, :] >= state.last_rows_from())
        if rows == "all":
            return real
        visual = state.visual_at(query_abs)
        return real & (visual if rows == "image" else ~visual)

    def _edited_keys(self, key_abs: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the key positions whose weights are replaced (``visual``: their visual flags)."""
        keys = self.intervention.keys
        if keys == "all":
            return torch.ones_like(visual)
        return visual if keys == "image" else ~visual & self.prompts.state.real(key_abs)

    def selection(self, num_q: int, num_k: int, device: torch.device) -> Selection | None:
        """The edited rows and keys of a ``(Q, K)`` attention block of this step on ``device`` (``None``: no row is
        edited); computed by the first edited layer and reused by the others."""
        if self._step != self.prompts.step:
            self._step, self._memo = self.prompts.step, {}
        if (num_q, num_k, None) not in self._memo:
            self._memo[num_q, num_k, None] = self._select(num_q, num_k)
        if (num_q, num_k, device) not in self._memo:
            plain = self._memo[num_q, num_k, None]
            self._memo[num_q, num_k, device] = None if plain is None else plain.to(device)
        return self._memo[num_q, num_k, device]

    def _select(self, num_q: int, num_k: int) -> Selection | None:
        state = self.prompts.state
        known = self.intervention.rows == "last" and state.continuation_start is None and not state.right_padded
        found = self._last_rows(num_q) if known else self._rows_found(num_q)
        if found is None:
            return None
        needed, query_abs, rows, first_query = found
        key_abs = state.positions(num_k)
        visual = state.visual_at(key_abs)
        edited = self._edited_keys(key_abs, visual)
        return Selection(needed, query_abs, rows, key_abs, visual, edited, first_query, state.length - num_k)

    def _last_rows(self, num_q: int) -> Rows | None:
        """``attn_rows=last`` while generating (left padding or none): every row from the one that predicts the first
        generated token on, for every sample; known on the host, so no host sync."""
        state = self.prompts.state
        first_row = state.length - num_q
        first = max(state.prompt_len - 1, first_row)
        if first >= state.length:
            return None
        device = state.is_visual.device
        needed = None if first == first_row else torch.arange(first - first_row, num_q, device=device)
        rows = torch.ones(state.is_visual.shape[0], state.length - first, dtype=torch.bool, device=device)
        return needed, torch.arange(first, state.length, device=device)[None, :], rows, first

    def _rows_found(self, num_q: int) -> Rows | None:
        """The edited rows of any selection, found from the tracked prompt (host syncs)."""
        query_abs = self.prompts.state.positions(num_q)
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
        return needed, query_abs, rows, int(query_abs.min())
