"""The edited path of an attention call: only the edited rows of edited layers pay for materialised weights.

For each call, :class:`EditedAttention` takes this step's :class:`~lmms_lostattn.intervention.selection.Selection`;
without one it passes the call through. Otherwise the original kernel computes every row, and the rows the
selection needs are recomputed from float32 scores with the learned weights replaced on the edited entries
(:func:`lmms_lostattn.intervention.patterns.edited_weights`) and written back in place; entries outside stay
bitwise. With eager, the returned attention weights (e.g. ``output_attentions``) are the edited ones.

The scores come from the query pre-multiplied by the scaling (one pass over the query, not over the scores), each
key-value head against its own query heads (no ``repeat_kv`` copy). What depends on the forward step only (the
allowed keys, the edited entries of any head, the head-score key weights and, where every layer shares it, the
pattern) is worked out by the first edited layer and kept on the selection for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmms_lostattn.config.spec import PRIOR_MODES, Intervention
from lmms_lostattn.intervention.kernel import eager_passthrough
from lmms_lostattn.intervention.patterns import SHARED_LAYER, Coordinates, band_heads, edited_weights
from lmms_lostattn.intervention.prior_hooks import prior_at
from lmms_lostattn.intervention.prompt import InterventionError, PromptTracker
from lmms_lostattn.intervention.selection import Selection, Selector

# Attention-function arguments that change the weights in ways the edited path does not rebuild from q.k (softcap it
# does): learned sinks (gpt-oss's s_aux), relative position biases, sparse key indices. A call passing one is refused.
UNMODELLED_ARGUMENTS = ("s_aux", "sinks", "position_bias", "indices", "block_indices")


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


def grouped(block: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H, Q, X)`` as ``(B, H / groups, groups * Q, X)``: the query heads of each key-value head stacked, so a
    matmul with the ``(B, H / groups, ...)`` keys or values needs no ``repeat_kv`` copy (a view for one group)."""
    return block.reshape(block.shape[0], -1, groups * block.shape[2], block.shape[3])


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
        unmodelled = [name for name in UNMODELLED_ARGUMENTS if kwargs.get(name) is not None]
        if unmodelled:
            raise InterventionError(
                f"lostattn: {type(module).__name__} passes {', '.join(unmodelled)} to its attention function, which "
                "changes the attention weights beyond q.k (e.g. learned attention sinks); the edited path does not "
                "model it. Use attn=noise_delta or attn=noise_qkv, or attn=none with the statistics."
            )
        needed, out, every_row = selection.needed, None, query
        if needed is not None:
            out, base_weights = passthrough(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            query = rows_of(query, needed)
        groups, shape = query.shape[1] // key.shape[1], (*query.shape[:3], key.shape[2])  # query heads per kv head
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = torch.matmul(grouped(query.float() * scaling, groups), key.float().transpose(-1, -2)).view(shape)
        if kwargs.get("softcap") is not None:
            if self.intervention.scale == "scores":
                raise InterventionError(
                    "lostattn: attn_scale=scores is defined on plain scaled q.k scores; this model soft-caps them "
                    "(softcap). Use attn_scale=none."
                )
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        step = self._step_masks(module, attention_mask, selection)
        allowed = step["allowed"]
        if "bias" in step:
            scores += step["bias"]
        heads = self._edited_heads(scores, allowed, selection, step)
        coords = self._coordinates(layer, selection, query.device)
        score_scale = None
        if self.intervention.scale == "scores":
            score_scale = self._score_scale(every_row, key, scaling, scores, step, selection)
        weights = edited_weights(scores, allowed, step["entries"], self.intervention, coords, score_scale, heads, step)
        edited = torch.matmul(grouped(weights.to(value.dtype), groups), value).view(*shape[:3], -1)  # (B, H, Qs, Dv)
        edited = edited.transpose(1, 2)
        if out is None:  # every row edited; the eager kernel also returns the weights (output_attentions)
            return edited.contiguous(), weights.to(query.dtype) if passthrough is eager_passthrough else None
        if "changed" not in step:
            step["changed"] = step["entries"].any(dim=-1, keepdim=True)
        changed = step["changed"] if heads is None else step["changed"] & heads  # entries outside stay bitwise
        out = out.transpose(1, 2)  # (B, H, Q, Dv), a view: the writes below land in the kernel's output
        set_rows(out, needed, torch.where(changed, edited.transpose(1, 2), rows_of(out, needed)))
        if base_weights is not None:
            set_rows(base_weights, needed, torch.where(changed, weights.to(base_weights.dtype),
                                                       rows_of(base_weights, needed)))
        return out.transpose(1, 2), base_weights

    @staticmethod
    def _step_masks(
        module: nn.Module, attention_mask: torch.Tensor | None, selection: Selection
    ) -> dict[str, Any]:
        """What the edited layers of a step share for one attention mask, worked out by the first of them and kept
        on the selection: the allowed keys of the computed rows, additive biases beyond the mask, the edited
        entries of any head (``(B, 1|H, Qs, K)``), ``blocked`` = None where every key is allowed;
        also what :func:`~lmms_lostattn.intervention.patterns.edited_weights` keeps."""
        causal = getattr(module, "is_causal", True)
        held = selection.memo.get((id(attention_mask), causal))
        if held is not None and held[0] is attention_mask:
            return held[1]
        mask = None if attention_mask is None else attention_mask[..., : selection.key_abs.shape[0]]
        if mask is not None and selection.needed is not None and mask.shape[2] > 1:
            mask = rows_of(mask, selection.needed)
        allowed = allowed_keys(module, mask, selection.query_abs, selection.key_abs)
        entries = allowed & selection.key_edited[:, None, None, :] & selection.rows[:, None, :, None]
        step = {"allowed": allowed, "entries": entries}
        if attention_mask is None and (not causal or selection.first_query >= selection.keys.stop - 1):
            step["blocked"] = None  # every key allowed (a causal decoding step), known on the host
        if mask is not None and mask.dtype != torch.bool:
            step["bias"] = mask.float().masked_fill(~allowed, 0.0)
        selection.memo[id(attention_mask), causal] = (attention_mask, step)
        return step

    def _edited_heads(
        self, scores: torch.Tensor, allowed: torch.Tensor, selection: Selection, step: dict[str, Any]
    ) -> torch.Tensor | None:
        """``(B|1, H, Qs|1, 1)`` bool: the edited heads of each row (``None``: every head)."""
        heads = self.intervention.heads
        if heads.kind == "band":
            sides = self.intervention.head_score == "sides"
            visual = selection.key_visual[:, None, None, :]
            return band_heads(scores, allowed, visual, heads.band, sides, step)
        if heads.kind == "indices":
            if "heads" not in step:
                step["heads"] = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
                step["heads"][list(heads.indices)] = True
            return step["heads"].view(1, -1, 1, 1)
        return None

    def _coordinates(self, layer: int, selection: Selection, device: torch.device) -> Coordinates:
        """Where the block's entries sit, for the draws (memoised per prompt, layer and device)."""
        state, shared = self.prompts.state, self.intervention.draw == "shared"
        memo = state.draws.setdefault((SHARED_LAYER if shared else layer, device), {})
        sample_key, first_real = state.sample_key.to(device), state.first_real.to(device)
        prior = None
        if self.intervention.mode in PRIOR_MODES:
            prior = prior_at(state, selection.keys, device, self.intervention.mode)
        mixed = state.mixed_coordinates.setdefault(device, {})
        return Coordinates(
            sample_key, first_real, layer, selection.keys, selection.query_abs, memo, shared, prior, mixed
        )

    def _prompt_block(
        self, num_q: int, num_k: int, selection: Selection, device: torch.device
    ) -> tuple[torch.Tensor, ...] | None:
        """For :meth:`_score_scale`, once per step: ``None`` for generated rows only, else the prompt's real rows
        ``(B, Q)`` and keys ``(B, K)`` as 0/1 with their counts ``(B, 1, 1)``, and which computed rows are prompt rows
        ``(B, Qs)``."""
        state = self.prompts.state
        last = state.last_rows_from()  # an int while generating: no host sync on a decoding step
        if selection.first_query > (last if isinstance(last, int) else int(last.max())):
            return None
        row_start = state.length - num_q
        if row_start > 0:
            raise InterventionError(
                "lostattn: attn_scale=scores needs the whole prompt in one forward pass (a chunked prefill starts at "
                f"position {row_start})"
            )
        start = torch.as_tensor(last, device=state.first_real.device).reshape(-1, 1) + 1  # (B|1, 1)
        first = state.first_real[:, None]
        row_abs, key_abs = state.positions(num_q)[None, :], state.positions(num_k)[None, :]
        in_rows = ((row_abs >= first) & (row_abs < start)).float().to(device)  # (B, Q)
        in_keys = ((key_abs >= first) & (key_abs < start)).float().to(device)  # (B, K)
        row_count = in_rows.sum(1).clamp_min(1)[:, None, None]
        key_count = in_keys.sum(1).clamp_min(1)[:, None, None]
        return in_rows, row_count, in_keys, key_count, selection.query_abs < start.to(device)

    def _score_scale(
        self,
        every_row: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        scores: torch.Tensor,
        step: dict[str, Any],
        selection: Selection,
    ) -> torch.Tensor:
        """|mean(s)| of each computed row ``(B, 1, Qs, 1)`` for ``attn_scale=scores``, as cached generation computes
        it for the sample alone: a prompt row takes the mean of the scaled q.k of the prefill (every head, real row
        and real key of the prompt, before the mask), a generated (or scored) row the mean over its own allowed keys
        (a cached decoding step computes that one row). Recomputation without a cache gives the same values."""
        device = scores.device
        allowed = step["allowed"]
        if step.get("blocked", allowed) is None:  # every key allowed
            row_mean = scores.mean(dim=(1, 3))
        else:
            if "row_keys" not in step:
                step["row_keys"] = allowed.sum(-1).clamp_min(1)
            row_mean = (torch.where(allowed, scores, 0.0).sum(-1) / step["row_keys"]).mean(dim=1)
        if "prompt" not in step:
            step["prompt"] = self._prompt_block(every_row.shape[2], key.shape[2], selection, device)
        if step["prompt"] is None:  # generated rows only (a cached decoding step)
            return row_mean.abs()[:, None, :, None]
        in_rows, row_count, in_keys, key_count, prompt_rows = step["prompt"]
        mean_query = torch.einsum("bhqd,bq->bhd", every_row.float(), in_rows) / row_count
        mean_key = torch.einsum("bhkd,bk->bhd", key.float(), in_keys) / key_count  # per key-value head
        mean_key = mean_key.repeat_interleave(every_row.shape[1] // key.shape[1], dim=1)  # per query head
        prompt_mean = (mean_query * mean_key).sum(-1).mean(dim=1) * scaling  # (B,): mean over heads, rows, keys
        return torch.where(prompt_rows, prompt_mean[:, None], row_mean).abs()[:, None, :, None]
