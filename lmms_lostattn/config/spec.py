"""The intervention spec: parsed from lmms-eval ``model_args``, validated, resolved against a model, hashed.

Two stages keep errors early: :meth:`InterventionSpec.from_model_args` checks names, values and combinations
without touching the model; :meth:`InterventionSpec.resolve` checks layer and head ranges against the model's
config (read before the weights load) and fills family presets. The resolved :class:`Intervention` is what the
attention function runs; every result records it with :func:`spec_hash`, a hash of it and the statistics settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from lmms_lostattn.config.values import (
    HeadSelection,
    SpecError,
    check_ascii,
    check_layers_syntax,
    choice,
    list_text,
    number_value,
    parse_heads,
    parse_layers,
    rank_quantile,
    refusal,
)

PRIOR_MODES = ("vision_attention", "complexity")  # the released code's image priors (lmms_lostattn.intervention.priors)
ATTN_MODES = (
    "none",
    "gaussian",
    *PRIOR_MODES,
    "uniform",
    "identity",
    "sink",
    "shuffle",
    "knockout",
    "noise_delta",
    "noise_qkv",
)
WEIGHT_MODES = ("gaussian", *PRIOR_MODES, "uniform", "identity", "sink", "shuffle", "knockout")
SPACES = ("logits", "probs")
ROWS = ("last", "text", "image", "all")
KEYS = ("image", "text", "all")
DISTS = ("dirichlet", "normal", "uniform")
MAX_SIGMA = 1e37  # sigma times a normal draw (|z| < 6.8 at the hash's resolution) stays within float32
_SIGMAS = f"a number in (0, {MAX_SIGMA:g}] (larger overflows float32)"
SCALES = ("none", "scores")
DRAWS = ("per_head", "shared")
HEAD_SCORES = ("pooled", "sides")
PRESETS = ("paper",)
STATS = ("none", "paper", "released", "all")
STATS_GROUPS = ("all", "image", "text")
STATS_REFERENCES = ("module", "layer")
STATS_COMBINES = ("mean", "l2", "sum")  # how ΔD joins its two residual ratios (lmms_lostattn.statistics.metrics)

# Which optional arguments each mode reads; giving any other one is an error (it would be silently ignored).
_EDITS = frozenset(  # what every attention-weight mode reads
    {
        "attn_space",
        "attn_layers",
        "attn_heads",
        "attn_rows",
        "attn_keys",
        "attn_lambda",
        "attn_preset",
        "attn_head_score",
    }
)
_USES: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "gaussian": _EDITS | {"attn_dist", "attn_sigma", "attn_seed", "attn_scale", "attn_draw"},
    **dict.fromkeys((*PRIOR_MODES, "uniform"), _EDITS | {"attn_scale"}),  # a fixed p
    **dict.fromkeys(("identity", "sink"), _EDITS),  # a fixed p, in probs space only (no scale to the scores)
    "shuffle": _EDITS | {"attn_seed"},
    "knockout": _EDITS,
    "noise_delta": frozenset({"attn_layers", "attn_rows", "attn_sigma", "attn_seed"}),
    "noise_qkv": frozenset({"attn_layers", "attn_sigma", "attn_seed"}),
}

@dataclass(frozen=True)
class Intervention:
    """A spec resolved against one model: every choice concrete. Runs the attention function; goes with results."""

    mode: str
    layers: tuple[int, ...] = ()
    heads: HeadSelection = HeadSelection("all")
    space: str = "probs"
    rows: str = "last"
    keys: str = "image"
    lam: float = 1.0
    dist: str = "dirichlet"
    sigma: float = 1.0
    seed: int = 0
    preset: str | None = None
    scale: str = "none"
    draw: str = "per_head"
    head_score: str = "pooled"

    @property
    def edits_weights(self) -> bool:
        return self.mode in WEIGHT_MODES

    @property
    def draws_per_document(self) -> bool:
        """Whether a request's outcome depends on its document's identity, not only on its text: the random draws
        (Gaussian patterns, shuffles, noise updates) are keyed by the document."""
        return self.mode in ("gaussian", "shuffle", "noise_delta")

    @property
    def edits_rows(self) -> bool:
        """Whether the mode edits the query rows ``attn_rows`` picks (the attention-weight modes and noise_delta)."""
        return "attn_rows" in _USES[self.mode]

    def image_args(self) -> list[str]:
        """The arguments by which this intervention edits image tokens (``attn_keys=image``, ``attn_rows=image``):
        a prompt without image tokens leaves it nothing to edit."""
        return [f"{arg}=image" for arg, applies, value in (("attn_keys", self.edits_weights, self.keys),
                                                          ("attn_rows", self.edits_rows, self.rows))
                if applies and value == "image"]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["heads"] = self.heads.describe()
        return data


@dataclass(frozen=True)
class StatsConfig:
    """Which residual statistics to compute (see SPEC §3). ``reference``: what the FFN update's RID is measured
    against (``module``: the FFN's own input; ``layer``: the layer's input); ``combine``: how ΔD joins its two
    residual ratios (``mean``, ``l2``, ``sum``)."""

    kind: str = "none"
    groups: tuple[str, ...] = ("all",)
    max_tokens: int = 1024
    reference: str = "module"
    combine: str = "mean"

    @property
    def table_group(self) -> str:
        """The token group the table rows report: ``all`` when measured, else the first group asked for."""
        return "all" if "all" in self.groups else self.groups[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stats": self.kind,
            "stats_groups": list(self.groups),
            "stats_max_tokens": self.max_tokens,
            "stats_reference": self.reference,
            "stats_combine": self.combine,
        }


def spec_hash(intervention: Intervention, stats: StatsConfig) -> str:
    """Stable 12-hex-digit hash of every choice a run's numbers depend on: the resolved intervention (with the name
    of the preset it was asked for by) and the statistics settings, however they were spelt (independent of dict
    order and Python version). Spellings of one setting are hashed one way: the statistics groups after the table's
    in sorted order, ``stats=released`` as ``paper`` with its reference and combination (and every head listed as
    ``all``, by :meth:`InterventionSpec.resolve`)."""
    others = sorted(group for group in stats.groups if group != stats.table_group)
    measured = stats.to_dict() | {"stats": "paper" if stats.kind == "released" else stats.kind,
                                  "stats_groups": [stats.table_group, *others]}
    canonical = json.dumps({"intervention": intervention.to_dict(), "stats": measured}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FamilyPreset:
    """The paper's per-family defaults (from the authors' released code): edited layers and head band, whether p is
    rescaled to the scores (``scale``), one p per prompt or per layer and head (``draw``), and the head score."""

    layers: str = "1:"
    heads: str = "p0.3-0.9"
    scale: str = "none"
    draw: str = "shared"
    head_score: str = "pooled"


@dataclass(frozen=True)
class InterventionSpec:
    """The plugin's ``model_args`` as the user gave them, validated. ``None`` means "not given"."""

    attn: str = "none"
    attn_space: str | None = None
    attn_layers: str | None = None
    attn_heads: HeadSelection | None = None
    attn_rows: str | None = None
    attn_keys: str | None = None
    attn_lambda: float | None = None
    attn_dist: str | None = None
    attn_sigma: float | None = None
    attn_seed: int | None = None
    attn_preset: str | None = None
    attn_scale: str | None = None
    attn_draw: str | None = None
    attn_head_score: str | None = None
    stats: StatsConfig = StatsConfig()

    ARGS = (
        "attn",
        "attn_space",
        "attn_layers",
        "attn_heads",
        "attn_rows",
        "attn_keys",
        "attn_lambda",
        "attn_dist",
        "attn_sigma",
        "attn_seed",
        "attn_preset",
        "attn_scale",
        "attn_draw",
        "attn_head_score",
        "stats",
        "stats_groups",
        "stats_max_tokens",
        "stats_reference",
        "stats_combine",
    )

    @classmethod
    def from_model_args(cls, args: Mapping[str, object]) -> InterventionSpec:
        """Validate the plugin's arguments (only those named in :attr:`ARGS`) and their combination."""
        unknown = [key for key in args if key not in cls.ARGS]
        if unknown:
            shown = {key: key if str(key).isidentifier() else repr(key) for key in unknown}  # a stray space shows
            named = ", ".join(
                f"{shown[key]} (did you mean {close[0]}?)" if (close := get_close_matches(key, cls.ARGS, 1))
                else shown[key]
                for key in unknown
            )
            raise SpecError(f"lostattn: unknown argument(s) {named}; accepted: {', '.join(cls.ARGS)}")
        given = {key: "none" if value is None else value for key, value in args.items()}  # lm-eval reads none as None
        for key, value in given.items():
            check_ascii(key, value)
        mode = choice("attn", given.get("attn", "none"), ATTN_MODES)
        fields: dict[str, Any] = {"attn": mode}
        if "attn_space" in given:
            fields["attn_space"] = choice("attn_space", given["attn_space"], SPACES)
        if "attn_layers" in given:
            fields["attn_layers"] = check_layers_syntax(given["attn_layers"])  # the range is checked by resolve()
        if "attn_heads" in given:
            fields["attn_heads"] = parse_heads(given["attn_heads"])
        if "attn_rows" in given:
            fields["attn_rows"] = choice("attn_rows", given["attn_rows"], ROWS)
        if "attn_keys" in given:
            fields["attn_keys"] = choice("attn_keys", given["attn_keys"], KEYS)
        if "attn_lambda" in given:
            lam = number_value("attn_lambda", given["attn_lambda"], float, "a number in [0, 1]")
            if not 0.0 <= lam <= 1.0:
                raise refusal("attn_lambda", given["attn_lambda"], "a number in [0, 1]")
            fields["attn_lambda"] = lam + 0.0  # -0.0 is 0
        if "attn_dist" in given:
            fields["attn_dist"] = choice("attn_dist", given["attn_dist"], DISTS)
        if "attn_sigma" in given:
            sigma = number_value("attn_sigma", given["attn_sigma"], float, _SIGMAS)
            if not 0 < sigma <= MAX_SIGMA:
                raise refusal("attn_sigma", given["attn_sigma"], _SIGMAS)
            fields["attn_sigma"] = sigma
        if "attn_seed" in given:
            fields["attn_seed"] = number_value("attn_seed", given["attn_seed"], int, "an integer")
        if "attn_preset" in given:
            fields["attn_preset"] = choice("attn_preset", given["attn_preset"], PRESETS)
        for name, choices in (("attn_scale", SCALES), ("attn_draw", DRAWS), ("attn_head_score", HEAD_SCORES)):
            if name in given:
                fields[name] = choice(name, given[name], choices)
        fields["stats"] = _parse_stats(given)
        spec = cls(**fields)
        spec._check_combination()
        return spec

    def _check_combination(self) -> None:
        uses = _USES[self.attn]
        for name in self.ARGS:
            if name.startswith("attn_") and getattr(self, name) is not None and name not in uses:
                readers = [mode for mode in ATTN_MODES if name in _USES[mode]]
                raise SpecError(
                    f"lostattn: {name} has no effect with attn={self.attn}; it is read by attn="
                    f"{', '.join(readers)}. Remove it or pick one of those modes."
                )
        if self.attn in _POST_SOFTMAX_EDITS and self.attn_space == "logits":
            raise SpecError(
                f"lostattn: attn={self.attn} {_POST_SOFTMAX_EDITS[self.attn]}, which only post-softmax weights can do "
                "(blended into the logits, softmax would spread the row over every key); attn_space=logits is not "
                "defined for it (accepted: probs)"
            )
        if self.attn == "identity" and self.attn_keys not in (None, "all"):
            raise SpecError(
                f"lostattn: attn=identity puts each edited row on its own key, which needs "
                f"attn_keys=all (got attn_keys={self.attn_keys})"
            )
        if self.attn_scale == "scores" and (self.attn_space or _default_space(self.attn)) != "logits":
            space = (f"got attn_space={self.attn_space}" if self.attn_space is not None
                     else f"attn={self.attn} is in probs space unless attn_space=logits")
            raise SpecError(
                "lostattn: attn_scale=scores rescales p to the pre-softmax scores before the blend; it needs "
                f"attn_space=logits ({space})"
            )
        if self.attn == "gaussian" and self.attn_sigma is not None and self.attn_dist != "normal":
            raise SpecError(
                f"lostattn: attn_sigma only shapes attn_dist=normal for attn=gaussian "
                f"(got attn_dist={self.attn_dist or 'dirichlet'}); set attn_dist=normal or drop attn_sigma"
            )

    def resolve(self, num_layers: int, num_heads: int, preset: FamilyPreset | None = None) -> Intervention:
        """Fill defaults and the family preset; check layer and head ranges against the model."""
        if self.attn == "none":
            return Intervention(mode="none")
        preset = preset or FamilyPreset()
        use_paper = self.attn_preset == "paper"
        layers = self.attn_layers or (preset.layers if use_paper else "all")
        try:
            layer_ids = parse_layers(layers, num_layers)
        except SpecError as error:
            if self.attn_layers is None:
                raise SpecError(
                    f"lostattn: attn_preset=paper selects layers {layers} for this family, but the model "
                    f"has layers 0-{num_layers - 1}; pass attn_layers explicitly"
                ) from error
            raise
        heads = self.attn_heads or (parse_heads(preset.heads) if use_paper else HeadSelection("all"))
        if heads.kind == "indices" and heads.indices[-1] >= num_heads:
            accepted = f"head indices 0-{num_heads - 1} (this model has {num_heads})"
            raise refusal("attn_heads", heads.describe(), accepted)
        if heads.kind == "indices" and heads.indices == tuple(range(num_heads)):
            heads = HeadSelection("all")  # the same edit, recorded and hashed one way
        low, high = heads.band
        if heads.kind == "band" and not any(low <= rank_quantile(rank, num_heads) <= high for rank in range(num_heads)):
            where = f"this model's {num_heads} heads sit at rank quantiles k/{max(num_heads - 1, 1)}"
            if self.attn_heads is None:
                raise SpecError(
                    f"lostattn: attn_preset=paper selects heads {heads.describe()} for this family, but none of "
                    f"{where}; pass attn_heads explicitly"
                )
            raise refusal("attn_heads", heads.describe(), f"a band holding at least one head ({where})")
        if self.attn_head_score is not None and heads.kind != "band":
            raise SpecError(
                f"lostattn: attn_head_score={self.attn_head_score} ranks heads for a pA-B band, but the heads are "
                f"attn_heads={heads.describe()}; pass attn_heads=pA-B or drop attn_head_score"
            )
        default_rows = "all" if self.attn == "noise_delta" else "last"
        default_keys = "all" if self.attn == "identity" else "image"
        space = self.attn_space or _default_space(self.attn)
        scale = self.attn_scale or (preset.scale if use_paper and space == "logits" else "none")
        return Intervention(
            mode=self.attn,
            layers=layer_ids,
            heads=heads if self.attn in WEIGHT_MODES else HeadSelection("all"),
            space=space,
            rows=self.attn_rows or default_rows,
            keys=self.attn_keys or default_keys,
            lam=1.0 if self.attn_lambda is None else self.attn_lambda,
            dist=self.attn_dist or "dirichlet",
            sigma=1.0 if self.attn_sigma is None else self.attn_sigma,
            seed=0 if self.attn_seed is None else self.attn_seed,
            preset=self.attn_preset,
            scale=scale if "attn_scale" in _USES[self.attn] else "none",
            draw=(self.attn_draw or (preset.draw if use_paper else "per_head"))
            if self.attn == "gaussian"
            else "per_head",
            head_score=(self.attn_head_score or (preset.head_score if use_paper else "pooled"))
            if heads.kind == "band"
            else "pooled",
        )


# The modes whose edit is a set of post-softmax weights, and what it does.
_POST_SOFTMAX_EDITS = {
    "knockout": "zeroes the edited weights without renormalising",
    "identity": "puts all of each edited row's mass on the row's own key",
    "sink": "puts all of the edited mass on the first edited key",
}


def _default_space(mode: str) -> str:
    """Where a mode edits when ``attn_space`` is not given: the paper's logits for ``gaussian`` and the image priors,
    else weights."""
    return "logits" if mode in ("gaussian", *PRIOR_MODES) else "probs"


def _parse_stats(given: Mapping[str, object]) -> StatsConfig:
    kind = choice("stats", given.get("stats", "none"), STATS)
    groups_text = list_text(given.get("stats_groups", "all")).lower()
    groups = tuple(dict.fromkeys(groups_text.split(","))) if groups_text else ()
    if not groups or any(group not in STATS_GROUPS for group in groups):
        raise refusal("stats_groups", given.get("stats_groups"), "a list drawn from all, image, text (e.g. all,image)")
    max_tokens = number_value("stats_max_tokens", given.get("stats_max_tokens", 1024), int, "an integer >= 2")
    if max_tokens < 2:
        raise refusal("stats_max_tokens", max_tokens, "an integer >= 2")
    options = ("stats_groups", "stats_max_tokens", "stats_reference", "stats_combine")
    if kind == "none" and any(name in given for name in options):
        raise SpecError(f"lostattn: {'/'.join(options)} have no effect with stats=none; set stats=paper|released|all")
    released = kind == "released"  # the authors' released building blocks: the layer's input, l2
    reference = choice(
        "stats_reference", given.get("stats_reference", "layer" if released else "module"), STATS_REFERENCES
    )
    combine = choice("stats_combine", given.get("stats_combine", "l2" if released else "mean"), STATS_COMBINES)
    return StatsConfig(kind=kind, groups=groups, max_tokens=max_tokens, reference=reference, combine=combine)
