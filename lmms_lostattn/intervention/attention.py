"""The edited path of an attention call: only the edited rows of edited layers pay for materialised weights.

For each call, :class:`EditedAttention` takes this step's :class:`~lmms_lostattn.intervention.selection.Selection`;
without one it passes the call through. Otherwise the original kernel computes every row, and the rows the
selection needs are recomputed from float32 scores with the learned weights replaced on the edited entries
(:func:`lmms_lostattn.intervention.patterns.edited_weights`) and written back in place; entries outside stay
bitwise. With eager, the returned attention weights (e.g. ``output_attentions``) are the edited ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmms_lostattn.compat.internals import internal
from lmms_lostattn.config.spec import PRIOR_MODES, Intervention
from lmms_lostattn.intervention.kernel import eager_passthrough
from lmms_lostattn.intervention.patterns import SHARED_LAYER, Coordinates, band_heads, edited_weights
from lmms_lostattn.intervention.prior_hooks import prior_at
from lmms_lostattn.intervention.prompt import InterventionError, PromptTracker
from lmms_lostattn.intervention.selection import Selection, Selector

repeat_kv = internal("transformers.integrations.sdpa_attention", "repeat_kv")


def rows_of(block: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """Rows ``needed`` (``(Qs,)``, or ``(B, Qs)`` per sample) of a ``(B|1, H|1, Q, ...)`` block, along dim 2."""
    if needed.dim() == 1:
        return block[:, :, needed]
    block = block.expand(needed.shape[0], *block.shape[1:])
    index = needed[:, None, :, None].expand(-1, block.shape[1], -1, block.shape[3])
    return block.gather(2, index)


def set_rows(block: torch.Tensor, needed: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` into rows ``needed`` of a ``(B, H, Q, ...)`` block in place (``needed`` distinct per sample)."""
    if needed.dim() == 1:
        block[:, :, needed] = rows
    else:
        block.scatter_(2, needed[:, None, :, None].expand_as(rows), rows)


def allowed_keys(
    module: nn.Module, mask: torch.Tensor | None, query_abs: torch.Tensor, key_abs: torch.Tensor
) -> torch.Tensor:
    """The attention mask of the computed rows (``query_abs``: ``(B|1, Qs)``) as bool ``(B|1, 1|H, Qs, K)``;
    ``None`` means plain causal."""
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if not getattr(module, "is_causal", True):
        return torch.ones(1, 1, query_abs.shape[1], key_abs.shape[0], dtype=torch.bool, device=key_abs.device)
    return (key_abs[None, None, :] <= query_abs[:, :, None])[:, None]


class EditedAttention:
    """Attention with the edited rows recomputed from materialised, replaced weights."""

    def __init__(self, intervention: Intervention, prompts: PromptTracker, selector: Selector) -> None:
        self.intervention = intervention
        self.prompts = prompts
        self.selector = selector

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
        """One attention call of decoder layer ``layer``, as the kernel ``passthrough`` would be called."""
        selection = self.selector.selection(query.shape[2], key.shape[2], query.device)
        if selection is None:
            return passthrough(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        needed, out, every_row = selection.needed, None, query
        if needed is not None:
            out, base_weights = passthrough(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            query = rows_of(query, needed)
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
            mask = rows_of(mask, needed)
        allowed = allowed_keys(module, mask, selection.query_abs, selection.key_abs)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.float().masked_fill(~allowed, 0.0)  # additive biases beyond the causal mask
        edit = self._edited_entries(scores, allowed, selection, query.shape[1])
        coords = self._coordinates(layer, selection, query.device)
        score_scale = None
        if self.intervention.scale == "scores":
            score_scale = self._score_scale(every_row, key, scaling, scores, allowed, selection)
        weights = edited_weights(scores, allowed, edit, self.intervention, coords, score_scale)
        edited = torch.matmul(weights.to(value.dtype), value).transpose(1, 2)  # (B, Qs, H, Dv)
        if out is None:  # every row edited; the eager kernel also returns the weights (output_attentions)
            return edited.contiguous(), weights.to(query.dtype) if passthrough is eager_passthrough else None
        changed = edit.any(dim=-1).unsqueeze(-1)  # (B, H, Qs, 1): entries outside stay bitwise
        out = out.transpose(1, 2)  # (B, H, Q, Dv), a view: the writes below land in the kernel's output
        set_rows(out, needed, torch.where(changed, edited.transpose(1, 2), rows_of(out, needed)))
        if base_weights is not None:
            set_rows(base_weights, needed, torch.where(changed, weights.to(base_weights.dtype),
                                                       rows_of(base_weights, needed)))
        return out.transpose(1, 2), base_weights

    def _edited_entries(
        self, scores: torch.Tensor, allowed: torch.Tensor, selection: Selection, num_heads: int
    ) -> torch.Tensor:
        """``(B, H, Qs, K)`` bool: allowed entries of edited rows, keys and heads."""
        edit = allowed & selection.key_edited[:, None, None, :] & selection.rows[:, None, :, None]
        heads = self.intervention.heads
        if heads.kind == "band":
            sides = self.intervention.head_score == "sides"
            edit = edit & band_heads(scores, allowed, selection.key_visual[:, None, None, :], heads.band, sides)
        elif heads.kind == "indices":
            chosen = torch.zeros(num_heads, dtype=torch.bool, device=scores.device)
            chosen[list(heads.indices)] = True
            edit = edit & chosen.view(1, -1, 1, 1)
        return edit

    def _coordinates(self, layer: int, selection: Selection, device: torch.device) -> Coordinates:
        """Where the block's entries sit, for the draws (memoised per prompt, layer and device)."""
        state, shared = self.prompts.state, self.intervention.draw == "shared"
        memo = state.draws.setdefault((SHARED_LAYER if shared else layer, device), {})
        sample_key, first_real = state.sample_key.to(device), state.first_real.to(device)
        prior = None
        if self.intervention.mode in PRIOR_MODES:
            prior = prior_at(state, selection.keys, device, self.intervention.mode)
        return Coordinates(sample_key, first_real, layer, selection.keys, selection.query_abs, memo, shared, prior)

    def _score_scale(
        self,
        every_row: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        scores: torch.Tensor,
        allowed: torch.Tensor,
        selection: Selection,
    ) -> torch.Tensor:
        """|mean(s)| of each computed row ``(B, 1, Qs, 1)`` for ``attn_scale=scores``, as cached generation computes
        it for the sample alone: a prompt row takes the mean of the scaled q.k of the prefill (every head, real row
        and real key of the prompt, before the mask), a generated (or scored) row the mean over its own allowed keys
        (a cached decoding step computes that one row). Recomputation without a cache gives the same values."""
        state, device = self.prompts.state, scores.device
        row_keys = allowed.expand_as(scores)
        row_mean = (torch.where(row_keys, scores, 0.0).sum(-1) / row_keys.sum(-1).clamp_min(1)).mean(dim=1)
        last = state.last_rows_from()  # an int while generating: no host sync on a decoding step
        last_max = last if isinstance(last, int) else int(last.max())
        if selection.first_query > last_max:  # generated rows only (a cached decoding step)
            return row_mean.abs()[:, None, :, None]
        row_start = state.length - every_row.shape[2]
        if row_start > 0:
            raise InterventionError(
                "lostattn: attn_scale=scores needs the whole prompt in one forward pass (a chunked prefill starts at "
                f"position {row_start})"
            )
        start = torch.as_tensor(last, device=state.first_real.device).reshape(-1, 1) + 1  # (B|1, 1)
        row_abs = state.positions(every_row.shape[2])
        first = state.first_real[:, None]
        key_abs = state.positions(key.shape[2])
        in_rows = ((row_abs[None, :] >= first) & (row_abs[None, :] < start)).float().to(device)  # (B, Q)
        in_keys = ((key_abs[None, :] >= first) & (key_abs[None, :] < start)).float().to(device)  # (B, K)
        mean_query = (
            torch.einsum("bhqd,bq->bhd", every_row.float(), in_rows) / in_rows.sum(1).clamp_min(1)[:, None, None]
        )
        mean_key = torch.einsum("bhkd,bk->bhd", key.float(), in_keys) / in_keys.sum(1).clamp_min(1)[:, None, None]
        prompt_mean = (mean_query * mean_key).sum(-1).mean(dim=1) * scaling  # (B,): mean over heads, rows, keys
        prompt_rows = selection.query_abs < start.to(device)  # (B, Qs)
        return torch.where(prompt_rows, prompt_mean[:, None], row_mean).abs()[:, None, :, None]
