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

p is a probability vector over E: ``gaussian`` draws it (flat Dirichlet, softmax of N(0, sigma^2) logits, or normalised
U(0, 1)), ``uniform`` is 1/|E|, ``identity`` is one-hot on the row's own key, ``sink`` one-hot on the first edited key;
``vision_attention`` and ``complexity`` are the image priors of :mod:`lmms_lostattn.intervention.priors` laid on the
image tokens. Random draws depend on (seed, sample, layer, head, key position) only, so one sample gets one p per layer
and head (``attn_draw=per_head``), or one p shared by every layer and head (``attn_draw=shared``, the released code),
reused by every edited row and every decoding step.

``attn_scale=scores`` (logits space; the released code's Llama and Qwen2 decoder files) blends
p' = p |mean(s)| / (2 mean_E(p)) instead of p, where mean(s) is the row's score scale handed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from lmms_lostattn.config.spec import PRIOR_MODES, Intervention
from lmms_lostattn.config.values import rank_quantile
from lmms_lostattn.intervention import rng

_NEG = torch.finfo(torch.float32).min
SHARED_LAYER = -1  # the layer coordinate of draws shared by every layer (``attn_draw=shared``)


def _exponential(key: torch.Tensor, *mixed: torch.Tensor | int) -> torch.Tensor:
    """Exp(1) draws, -log(u), kept above 0 (u rounds to 1 in float32 with probability 2^-24)."""
    return torch.log(rng.uniform_at(key, *mixed)).neg_().clamp_min_(torch.finfo(torch.float32).tiny)


# What one key draws for ``gaussian``, by ``attn_dist``, from its uniform or normal draw at mixed coordinates
# (:func:`rng.coordinate`): p is the normalised (or, for ``normal``, softmaxed) vector of these over the edited keys.
_KEY_DRAWS = {
    "dirichlet": _exponential,  # normalised Exp(1) draws: a flat Dirichlet
    "uniform": rng.uniform_at,
    "normal": rng.normal_at,
}


@dataclass(frozen=True)
class Coordinates:
    """Where the entries of a ``(B, H, Q, K)`` block sit, for deterministic draws.

    ``sample_key``: ``(B,)`` int64 keys from (seed, sample identity); ``first_real``: ``(B,)`` each sample's first
    non-padding position (draws use positions counted from it); ``layer``: decoder layer index; ``keys``: the
    absolute key positions (contiguous); ``query_abs``: absolute query positions, ``(Q,)`` or per sample ``(B, Q)``;
    ``shared``: key draws are the same for every layer and head (one p per prompt).

    ``memo``, if given, is where one prompt's per-key draws of this layer are kept, over positions ``0..n-1``, so
    decoding steps reuse the prompt's draws instead of drawing every key again; when keys beyond ``n`` are asked for,
    the memo grows to at least ``2n`` at once. The values are the same either way: every draw is a pure function of
    its coordinates. ``mixed``, if given, is where one prompt keeps its mixed head coordinates and its latest mixed
    key positions (:func:`rng.coordinate`) for every layer that draws at the same ones.
    """

    sample_key: torch.Tensor
    first_real: torch.Tensor
    layer: int
    keys: range
    query_abs: torch.Tensor
    memo: dict[str, torch.Tensor] | None = None
    shared: bool = False
    prior: torch.Tensor | None = None  # (B, K) image-prior values at the keys, for the prior modes
    mixed: dict[Hashable, Any] | None = None

    @property
    def queries(self) -> torch.Tensor:
        """``(B|1, Q)`` absolute query positions."""
        return torch.atleast_2d(self.query_abs)

    @property
    def key_abs(self) -> torch.Tensor:
        return torch.arange(self.keys.start, self.keys.stop, device=self.first_real.device)

    def _relative(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None, :] - self.first_real[:, None]

    def _heads(self, num_heads: int) -> torch.Tensor:
        return torch.arange(num_heads, device=self.first_real.device).view(1, -1, 1, 1)

    def key_draws(self, dist: str, num_heads: int) -> torch.Tensor:
        """Per-key draws ``(B, H, 1, K)`` for ``attn_dist=dist``: one per sample, head and key position (``(B, 1, 1,
        K)``, one per sample and key position, when ``shared``)."""
        known = None if self.memo is None else self.memo.get(dist)
        drawn = 0 if known is None else known.shape[-1]
        if self.memo is None or self.keys.start > drawn:  # nothing to keep, or a gap before these keys
            return self._draw(dist, num_heads, self.keys)
        if self.keys.stop > drawn:  # at least double: decoding steps then draw once every n steps, not every step
            new = self._draw(dist, num_heads, range(drawn, max(self.keys.stop, 2 * drawn)))
            known = new if known is None else torch.cat([known, new], dim=-1)
            self.memo[dist] = known
        return known[..., self.keys.start : self.keys.stop]

    def _draw(self, dist: str, num_heads: int, positions: range) -> torch.Tensor:
        layer, heads = (SHARED_LAYER, 1) if self.shared else (self.layer, num_heads)
        mixed = {} if self.mixed is None else self.mixed
        at_heads = _memoised(mixed, ("heads", heads), lambda: rng.coordinate(self._heads(heads)))
        kept_positions, at_keys = mixed.get("keys", (None, None))
        if kept_positions != positions:  # only the latest: a sliding window draws new keys every step
            rel = self._relative(torch.arange(positions.start, positions.stop, device=self.first_real.device))
            at_keys = rng.coordinate(rel[:, None, None])
            mixed["keys"] = positions, at_keys
        return _KEY_DRAWS[dist](self.sample_key.view(-1, 1, 1, 1), rng.coordinate(layer), at_heads, at_keys)

    def entry_draws(self, num_heads: int) -> torch.Tensor:
        """Uniform draws ``(B, H, Q, K)``: one per sample, head, query position and key position."""
        return rng.uniform(
            self.sample_key.view(-1, 1, 1, 1),
            self.layer,
            self._heads(num_heads),
            (self.queries - self.first_real[:, None])[:, None, :, None],
            self._relative(self.key_abs)[:, None, None, :],
            3,
        )


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys. A fully masked row becomes uniform, exactly as HF eager attention does."""
    return scores.masked_fill(~allowed, _NEG).softmax(dim=-1)


def _masked_softmax_(scores: torch.Tensor, allowed: torch.Tensor, memo: dict[str, Any]) -> torch.Tensor:
    """:func:`masked_softmax` that overwrites ``scores`` with the masked logits (``~allowed`` kept in ``memo``, where
    the caller may have put ``None``: every key allowed)."""
    blocked = _memoised(memo, "blocked", lambda: ~allowed)
    return (scores if blocked is None else scores.masked_fill_(blocked, _NEG)).softmax(dim=-1)


def same_in_every_layer(inter: Intervention) -> bool:
    """Whether every layer of a step gets the same pattern (all but per-head Gaussian draws, drawn per layer)."""
    return inter.mode != "gaussian" or inter.draw == "shared"


def _memoised(memo: dict[Any, Any], name: Hashable, make: Callable[[], Any]) -> Any:
    """``memo[name]``, made first if missing."""
    if name not in memo:
        memo[name] = make()
    return memo[name]


def _normalise(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (>= 0) over their sum on each row's ``mask``ed keys, zero outside ``mask``, and those sums
    ``(B, H|1, Q, 1)``. Values that are the same in every row (``(B|1, H|1, 1, K)``: per-key draws or priors) against
    a mask that is the same for every head (``(B|1, 1, Q, K)``) get the sums as one matrix product."""
    tiny = torch.finfo(values.dtype).tiny
    if values.shape[-2] == 1 and mask.shape[1] == 1:
        per_key = values[:, :, 0, :].transpose(-1, -2).unsqueeze(1)  # (B|1, 1, K, H|1)
        sums = torch.matmul(mask.to(values.dtype), per_key).permute(0, 3, 2, 1)  # (B, H|1, Q, 1)
        return torch.where(mask, values / sums.clamp_min(tiny), 0.0), sums
    values = torch.where(mask, values, 0.0)
    sums = values.sum(dim=-1, keepdim=True)
    return values / sums.clamp_min(tiny), sums


def pattern(
    inter: Intervention, edit: torch.Tensor, coords: Coordinates, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The predefined probability vector p over the edited keys of each row, ``(B, H|1, Q, K)``, zero elsewhere
    (``edit`` ``(B, 1|H, Q, K)``; per-head draws give H), and which rows p puts mass on, ``(B, H|1, Q, 1)``; ``None``
    where p is positive on every edited key (every row with an edited key has mass)."""
    if inter.mode == "uniform":
        return _normalise(torch.ones_like(edit, dtype=torch.float32), edit)[0], None
    if inter.mode == "identity":
        p, sums = _normalise((coords.key_abs.view(1, 1, 1, -1) == coords.queries[:, None, :, None]).float(), edit)
        return p, sums > 0
    if inter.mode == "sink":
        first = edit.int().argmax(dim=-1, keepdim=True)
        return torch.zeros(edit.shape, device=edit.device).scatter_(-1, first, 1.0) * edit, None
    if inter.mode in PRIOR_MODES:
        p, sums = _normalise(coords.prior[:, None, None, :], edit)
        return p, sums > 0
    if inter.mode != "gaussian":
        raise ValueError(f"no predefined pattern for attn={inter.mode}")
    draws = coords.key_draws(inter.dist, num_heads)
    if inter.dist == "normal":
        return torch.where(edit, inter.sigma * draws, _NEG).softmax(dim=-1) * edit, None
    return _normalise(draws, edit)[0], None


def shuffle_within(values: torch.Tensor, edit: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Permute ``values`` among the edited keys of each row, in the random order given by ``draws`` in [0, 1).

    The i-th edited key (by position) receives the value of the edited key with the i-th smallest draw (equal
    draws in position order, so that padding before a row does not reorder it); entries outside ``edit`` keep their
    own values. ``edit`` may be shared by the heads (``(B, 1, Q, K)``): every head of ``values`` is permuted.
    """
    positions = torch.arange(values.shape[-1], device=values.device, dtype=torch.float32)
    tail = positions + positions.shape[0] + 2.0  # after every edited entry, in position order, in both sorts
    by_position = torch.where(edit, positions, tail).argsort(dim=-1, stable=True).expand_as(values)  # once per head
    by_draw = torch.where(edit, draws, tail).argsort(dim=-1, stable=True)
    return values.clone().scatter_(-1, by_position, values.gather(-1, by_draw))


def _head_key_weights(allowed: torch.Tensor, key_is_visual: torch.Tensor, sides: bool) -> torch.Tensor:
    """The weight of each key in a row's head score, ``(B|1, 1|H, Q, K)``, so that the score is the row's logits
    times these weights, summed: -1/n on the n allowed non-visual keys (``pooled``), or with ``sides``
    -1/(n_side · sides with keys) on the keys of each side."""
    text_keys = allowed & ~key_is_visual
    if not sides:
        return text_keys / -text_keys.sum(dim=-1, keepdim=True).clamp_min(1)
    shape = torch.broadcast_shapes(text_keys.shape, key_is_visual.shape)
    position = torch.arange(shape[-1], device=key_is_visual.device)
    visual = key_is_visual.expand(shape)
    first = torch.where(visual, position, shape[-1]).amin(dim=-1, keepdim=True)
    last = torch.where(visual, position, -1).amax(dim=-1, keepdim=True)
    masks = torch.stack([text_keys & (position < first), text_keys & (position > last)])  # (2, B, H, Q, K)
    count = masks.sum(dim=-1, keepdim=True)
    sides_seen = (count > 0).sum(dim=0).clamp_min(1)
    return (masks / (count.clamp_min(1) * -sides_seen)).sum(dim=0)


def head_scores(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    key_is_visual: torch.Tensor,
    sides: bool,
    memo: dict[str, Any] | None = None,
) -> torch.Tensor:
    """SAP's head score ``(B, H, Q)`` of each row: v_h = -mean of the row's logits over its allowed non-visual keys
    (``pooled``), or ``sides``: -(mean over those before the first visual key + mean over those after the last)/2,
    the mean of the one side there is when the other has no key (the released OneVision file). Computed as the
    logits times per-key weights (:func:`_head_key_weights`), one matrix product where the weights are the same for
    every head; they depend on the step only, and ``memo`` keeps them for the other layers."""
    memo = {} if memo is None else memo
    weights = _memoised(memo, "head_keys", lambda: _head_key_weights(allowed, key_is_visual, sides))
    if weights.shape[1] != 1:
        return (scores * weights).sum(dim=-1)
    return torch.matmul(scores.transpose(1, 2), weights[:, 0, :, :, None])[..., 0].transpose(1, 2)


def band_heads(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    key_is_visual: torch.Tensor,
    band: tuple[float, float],
    sides: bool = False,
    memo: dict[str, Any] | None = None,
) -> torch.Tensor:
    """SAP head selection ``(B, H, Q, 1)``: per row, rank heads by :func:`head_scores` and keep heads whose rank
    quantile rank/(H-1) lies in ``band`` (ties: lower head first)."""
    memo = {} if memo is None else memo
    value = head_scores(scores, allowed, key_is_visual, sides, memo)
    by_rank = _memoised(memo, "band", lambda: _in_band(scores.shape[1], band, scores.device))
    by_rank = by_rank.view(1, -1, 1).expand(value.shape)
    return by_rank.scatter(1, value.argsort(dim=1, stable=True), by_rank).unsqueeze(-1)  # head order[r] gets rank r's


def _in_band(num_heads: int, band: tuple[float, float], device: torch.device) -> torch.Tensor:
    """``(H,)`` bool: whether each rank's quantile lies in ``band``."""
    quantile = rank_quantile(torch.arange(num_heads, device=device).float(), num_heads)
    return (quantile >= band[0]) & (quantile <= band[1])


def edited_weights(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    edit: torch.Tensor,
    inter: Intervention,
    coords: Coordinates,
    score_scale: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
    memo: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Attention weights ``(B, H, Q, K)`` after replacing the learned attention on ``edit & heads`` (module
    docstring); ``scores`` is overwritten. ``edit`` ``(B, 1|H, Q, K)``: the edited entries, allowed keys of edited
    kinds in edited rows (a row's edited keys are the keys it allows among a set of the sample's); ``heads``
    ``(B|1, H, Q|1, 1)``: the edited heads (``None``: every head); ``score_scale`` ``(B, 1, Q, 1)``: |mean(s)| of each
    row, for ``attn_scale=scores``. ``memo`` keeps what depends on ``edit`` and ``allowed`` only for the other layers
    of a forward step, and what depends on the pattern too where every layer has the same one."""
    lam, memo = inter.lam, {} if memo is None else memo
    kept = memo if same_in_every_layer(inter) else {}
    if inter.mode == "shuffle":
        edit = edit if heads is None else edit & heads
        source = scores if inter.space == "logits" else masked_softmax(scores, allowed)
        target = shuffle_within(source, edit, coords.entry_draws(scores.shape[1]))
        mixed = torch.where(edit, (1.0 - lam) * source + lam * target, source)
        return masked_softmax(mixed, allowed) if inter.space == "logits" else mixed
    if inter.mode == "knockout":
        return _masked_softmax_(scores, allowed, memo).mul_(_keep_factor(edit, heads, lam, kept))
    target, mass = _memoised(kept, "target", lambda: pattern(inter, edit, coords, scores.shape[1]))
    if mass is not None:  # rows where p has no mass keep their weights
        edit = _memoised(kept, "edit", lambda: edit & mass)
    if inter.space == "logits":
        if inter.scale == "scores":  # p' = p |mean s| / (2 mean_E p) = p |E| |mean s| / 2: p sums to 1 over E
            unit = _memoised(kept, "unit_target", lambda: target * (edit.sum(dim=-1, keepdim=True) * 0.5))
            target = unit * score_scale
        replaced = target if lam == 1.0 else (1.0 - lam) * scores + lam * target  # lambda = 1: 0 s + p is p
        mixed = torch.where(edit if heads is None else edit & heads, replaced, scores)
        return _masked_softmax_(mixed, allowed, memo)
    weights = _masked_softmax_(scores, allowed, memo)
    # the row mass on the edited keys, as a GEMV: weights are 0 outside ``allowed``, so an edited row's edited keys
    # are the keys edited in any row
    keys = _memoised(kept, "keys", lambda: edit.any(dim=-2).unsqueeze(-1).float())
    gain = lam * (weights @ keys)
    return weights.mul_(_keep_factor(edit, heads, lam, kept)).addcmul_(target, gain if heads is None else gain * heads)


def _keep_factor(
    edit: torch.Tensor, heads: torch.Tensor | None, lam: float, memo: dict[str, Any]
) -> torch.Tensor:
    """What the learned weights are multiplied by: ``1 - lambda`` on the edited entries, 1 elsewhere."""
    if heads is None:
        return _memoised(memo, "keep", lambda: torch.where(edit, 1.0 - lam, 1.0))
    return torch.where(edit & heads, 1.0 - lam, 1.0)
