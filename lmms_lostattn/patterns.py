"""Predefined attention patterns and how they replace learned attention (SPEC §2). Pure tensor functions.

Shapes: ``scores`` are pre-softmax logits ``(B, H, Q, K)`` in float32; ``allowed`` is the attention mask as bool
(``True`` = may attend), broadcastable to ``scores``; ``edit`` marks the (row, key) entries whose weights are
replaced: allowed, selected key kind, selected row, selected head.

For an edited row with edited keys E, learned logits s and learned weights w = softmax(s):

* ``logits`` space (the paper's SAP): s_E <- (1 - lambda) s_E + lambda p_E, then the usual mask + softmax.
* ``probs`` space: w_E <- (1 - lambda) w_E + lambda m p_E with m = sum(w_E), so the row keeps the mass the learned
  row put on E and still sums to 1.
* ``knockout`` (probs only): w_E <- (1 - lambda) w_E, not renormalised (information-flow blocking).
* ``shuffle``: the learned values (logits or weights, by space) permuted among E, blended the same way.

p is a probability vector over E: ``gaussian`` draws it (flat Dirichlet, softmax of N(0, sigma^2) logits, or
normalised U(0, 1)), ``uniform`` is 1/|E|, ``identity`` is one-hot on the row's own key, ``sink`` one-hot on the
first edited key. Random draws depend on (seed, sample, layer, head, key position) only, so one sample gets one
p per layer and head, reused by every edited row and every decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_lostattn import rng
from lmms_lostattn.spec import Intervention

_NEG = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class Coordinates:
    """Where the entries of a ``(B, H, Q, K)`` block sit, for deterministic draws.

    ``sample_key``: ``(B,)`` int64 keys from (seed, sample identity); ``key_rel``/``query_rel``: ``(B, K)`` and
    ``(B, Q)`` positions counted from each sample's first non-padding token; ``layer``: decoder layer index.
    """

    sample_key: torch.Tensor
    layer: int
    key_rel: torch.Tensor
    query_rel: torch.Tensor

    def key_draws(self, num_heads: int) -> torch.Tensor:
        """Uniform draws ``(B, H, 1, K)``: one per sample, head and key position."""
        heads = torch.arange(num_heads, device=self.key_rel.device).view(1, -1, 1, 1)
        return rng.uniform(self.sample_key.view(-1, 1, 1, 1), self.layer, heads, self.key_rel[:, None, None, :])

    def key_normals(self, num_heads: int) -> torch.Tensor:
        """Standard normal draws ``(B, H, 1, K)``, same coordinates as :meth:`key_draws`."""
        heads = torch.arange(num_heads, device=self.key_rel.device).view(1, -1, 1, 1)
        return rng.normal(self.sample_key.view(-1, 1, 1, 1), self.layer, heads, self.key_rel[:, None, None, :])

    def entry_draws(self, num_heads: int) -> torch.Tensor:
        """Uniform draws ``(B, H, Q, K)``: one per sample, head, query position and key position."""
        heads = torch.arange(num_heads, device=self.key_rel.device).view(1, -1, 1, 1)
        return rng.uniform(
            self.sample_key.view(-1, 1, 1, 1),
            self.layer,
            heads,
            self.query_rel[:, None, :, None],
            self.key_rel[:, None, None, :],
            3,
        )


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys. A fully masked row becomes uniform, exactly as HF eager attention does."""
    return scores.masked_fill(~allowed, _NEG).softmax(dim=-1)


def _normalise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = torch.where(mask, values, 0.0)
    return values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def pattern(
    inter: Intervention, edit: torch.Tensor, coords: Coordinates, key_abs: torch.Tensor, query_abs: torch.Tensor
) -> torch.Tensor:
    """The predefined probability vector p over the edited keys of each row, ``(B, H, Q, K)``, zero elsewhere.

    ``key_abs``/``query_abs`` are absolute positions ``(K,)`` and ``(Q,)`` in the sequence (for ``identity``).
    """
    num_heads = edit.shape[1]
    if inter.mode == "uniform":
        return _normalise(torch.ones_like(edit, dtype=torch.float32), edit)
    if inter.mode == "identity":
        return _normalise((key_abs.view(1, 1, 1, -1) == query_abs.view(1, 1, -1, 1)).float(), edit)
    if inter.mode == "sink":
        first = edit.int().argmax(dim=-1, keepdim=True)
        return torch.zeros(edit.shape, device=edit.device).scatter_(-1, first, 1.0) * edit
    if inter.mode != "gaussian":
        raise ValueError(f"no predefined pattern for attn={inter.mode}")
    if inter.dist == "normal":
        logits = (inter.sigma * coords.key_normals(num_heads)).expand(edit.shape)
        return masked_softmax(logits, edit) * edit
    draws = coords.key_draws(num_heads)
    weights = -torch.log(draws) if inter.dist == "dirichlet" else draws
    return _normalise(weights.expand(edit.shape), edit)


def shuffle_within(values: torch.Tensor, edit: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Permute ``values`` among the edited keys of each row, in the random order given by ``draws`` in [0, 1).

    The i-th edited key (by position) receives the value of the edited key with the i-th smallest draw;
    entries outside ``edit`` keep their own values.
    """
    positions = torch.arange(values.shape[-1], device=values.device, dtype=torch.float32)
    tail = positions + positions.shape[0] + 2.0  # after every edited entry, in position order, in both sorts
    by_position = torch.where(edit, positions, tail).argsort(dim=-1)
    by_draw = torch.where(edit, draws, tail).argsort(dim=-1)
    return values.clone().scatter_(-1, by_position, values.gather(-1, by_draw))


def band_heads(
    scores: torch.Tensor, allowed: torch.Tensor, key_is_visual: torch.Tensor, band: tuple[float, float]
) -> torch.Tensor:
    """SAP head selection ``(B, H, Q, 1)``: per row, rank heads by v_h = -mean of the row's logits over allowed
    non-visual keys, and keep heads whose rank quantile rank/(H-1) lies in ``band`` (ties: lower head first).
    """
    text_keys = (allowed & ~key_is_visual).expand_as(scores)
    count = text_keys.sum(dim=-1).clamp_min(1)
    value = -torch.where(text_keys, scores, 0.0).sum(dim=-1) / count  # (B, H, Q)
    rank = value.argsort(dim=1, stable=True).argsort(dim=1).float()
    quantile = rank / max(scores.shape[1] - 1, 1)
    return ((quantile >= band[0]) & (quantile <= band[1])).unsqueeze(-1)


def edited_weights(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    edit: torch.Tensor,
    inter: Intervention,
    coords: Coordinates,
    key_abs: torch.Tensor,
    query_abs: torch.Tensor,
) -> torch.Tensor:
    """Attention weights ``(B, H, Q, K)`` after replacing the learned attention on ``edit`` (module docstring)."""
    lam = inter.lam
    if inter.mode == "shuffle":
        source = scores if inter.space == "logits" else masked_softmax(scores, allowed)
        target = shuffle_within(source, edit, coords.entry_draws(scores.shape[1]))
        mixed = torch.where(edit, (1.0 - lam) * source + lam * target, source)
        return masked_softmax(mixed, allowed) if inter.space == "logits" else mixed
    if inter.mode == "knockout":
        weights = masked_softmax(scores, allowed)
        return torch.where(edit, (1.0 - lam) * weights, weights)
    target = pattern(inter, edit, coords, key_abs, query_abs)
    edit = edit & (target.sum(dim=-1, keepdim=True) > 0)  # rows without an edited key keep their weights
    if inter.space == "logits":
        return masked_softmax(torch.where(edit, (1.0 - lam) * scores + lam * target, scores), allowed)
    weights = masked_softmax(scores, allowed)
    mass = (weights * edit).sum(dim=-1, keepdim=True)
    return torch.where(edit, (1.0 - lam) * weights + lam * mass * target, weights)
