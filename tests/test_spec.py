"""The intervention spec: parsing, validation, presets, hashing."""

from __future__ import annotations

import hashlib
import importlib
import json

import pytest
import torch

from lmms_lostattn.config.spec import FamilyPreset, Intervention, InterventionSpec, SpecError, StatsConfig, spec_hash
from lmms_lostattn.config.values import HeadSelection, parse_heads, parse_layers
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.patterns import band_heads


def spec(**args: object) -> InterventionSpec:
    return InterventionSpec.from_model_args(args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", tuple(range(32))),
        ("1-31", tuple(range(1, 32))),
        ("18,19,20", (18, 19, 20)),
        ("[18,19,20]", (18, 19, 20)),
        ("18;19;20", (18, 19, 20)),
        ('"18,19,20"', (18, 19, 20)),
        ("-6:", tuple(range(26, 32))),
        ("1:", tuple(range(1, 32))),
        ("-32:", tuple(range(32))),
        (":32", tuple(range(32))),
        ("2:5", (2, 3, 4)),
        (7, (7,)),
        ("-1", (31,)),
        ("0,18-19,-1", (0, 18, 19, 31)),
        (["1:"], tuple(range(1, 32))),  # a JSON list
        ([18.0, 19, "20"], (18, 19, 20)),
    ],
)
def test_parse_layers(text: object, expected: tuple[int, ...]) -> None:
    assert parse_layers(text, 32) == expected


@pytest.mark.parametrize(
    "text", ["40", "30-33", "-33", "5-3", "x", "", "40:", "-40:", "0:40", ":-33", "1.5", "-:", ":-", "1:-", "١-٣", "١:"]
)
def test_parse_layers_rejects_and_names_the_range(text: str) -> None:
    with pytest.raises(SpecError, match=r"attn_layers=.*layers 0-31"):
        parse_layers(text, 32)


def test_parse_heads() -> None:
    assert parse_heads("all") == HeadSelection("all")
    assert parse_heads("p0.3-0.9") == HeadSelection("band", band=(0.3, 0.9))
    assert parse_heads("7,0,5") == HeadSelection("indices", indices=(0, 5, 7))
    assert parse_heads(3) == HeadSelection("indices", indices=(3,))
    for bad in ("p0.9-0.3", "p1.2-1.5", "a,b", "p-1", "²", "0,2,³"):
        with pytest.raises(SpecError, match="attn_heads"):
            parse_heads(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"attn": "gausian"}, r"attn='gausian'.*gaussian"),
        ({"attn_layer": "1"}, r"unknown argument.*attn_layer.*accepted"),
        ({"attn": "uniform", "attn_lambda": 1.5}, r"attn_lambda=1.5.*\[0, 1\]"),
        ({"attn": "uniform", "attn_lambda": -0.1}, r"attn_lambda"),
        ({"attn": "uniform", "attn_lambda": "nan"}, r"attn_lambda"),
        ({"attn": "gaussian", "attn_dist": "normal", "attn_sigma": 0}, r"attn_sigma=0"),
        ({"attn": "uniform", "attn_space": "log"}, r"attn_space.*logits \| probs"),
        ({"attn": "uniform", "attn_rows": "first"}, r"attn_rows"),
        ({"attn": "uniform", "attn_keys": "video"}, r"attn_keys"),
        ({"attn": "gaussian", "attn_seed": 1.5}, r"attn_seed"),
        ({"attn": "gaussian", "attn_seed": float("inf")}, r"attn_seed=inf is not valid"),
        ({"attn": "gaussian", "attn_dist": "normal", "attn_sigma": 10**400}, r"attn_sigma=1000"),
        ({"attn": "gaussian", "attn_dist": "normal", "attn_sigma": 1e39}, r"attn_sigma=1e\+39.*\(0, 1e\+37\]"),
        ({"attn": "noise_delta", "attn_sigma": 2e37}, r"attn_sigma=2e\+37.*overflows float32"),
        ({"stats": "paper", "stats_max_tokens": float("inf")}, r"stats_max_tokens=inf is not valid"),
        ({"attn": "gaussian", "attn_preset": "authors"}, r"attn_preset.*paper"),
        ({"attn": "none", "attn_layers": "3"}, r"attn_layers has no effect with attn=none"),
        ({"attn": "uniform", "attn_dist": "normal"}, r"attn_dist has no effect with attn=uniform"),
        ({"attn": "noise_qkv", "attn_heads": "0"}, r"attn_heads has no effect with attn=noise_qkv"),
        ({"attn": "noise_delta", "attn_keys": "all"}, r"attn_keys has no effect"),
        ({"attn": "knockout", "attn_space": "logits"}, r"knockout.*accepted: probs"),
        ({"attn": "identity", "attn_space": "logits", "attn_keys": "all"}, r"identity puts all.*accepted: probs"),
        ({"attn": "sink", "attn_space": "logits"}, r"sink puts all of the edited mass.*accepted: probs"),
        ({"attn": "identity", "attn_scale": "scores"}, r"attn_scale has no effect with attn=identity"),
        ({"attn": "sink", "attn_scale": "scores"}, r"attn_scale has no effect with attn=sink"),
        ({"attn": "gaussian", "attn_seed": "١"}, r"attn_seed='١' is not valid; accepted: ASCII text"),
        ({"attn": "uniform", "attn_heads": "١"}, r"attn_heads='١' is not valid; accepted: ASCII text"),
        ({"attn": "identity", "attn_keys": "image"}, r"identity.*attn_keys=all"),
        ({"attn": "gaussian", "attn_sigma": 2}, r"attn_sigma only shapes attn_dist=normal"),
        ({"attn": "gaussian", "attn_scale": "logits"}, r"attn_scale='logits'.*none \| scores"),
        ({"attn": "gaussian", "attn_draw": "per_layer"}, r"attn_draw.*per_head \| shared"),
        ({"attn": "gaussian", "attn_head_score": "left"}, r"attn_head_score.*pooled \| sides"),
        ({"attn": "gaussian", "attn_space": "probs", "attn_scale": "scores"},
         r"attn_scale=scores.*needs attn_space=logits \(got attn_space=probs\)$"),
        ({"attn": "uniform", "attn_scale": "scores"}, r"attn_scale=scores.*attn=uniform is in probs space"),
        ({"attn": "uniform", "attn_draw": "shared"}, r"attn_draw has no effect with attn=uniform"),
        ({"attn": "shuffle", "attn_scale": "scores"}, r"attn_scale has no effect with attn=shuffle"),
        ({"stats": "some"}, r"stats='some'"),
        ({"stats": "paper", "stats_groups": "all,video"}, r"stats_groups"),
        ({"stats": "paper", "stats_max_tokens": 1}, r"stats_max_tokens"),
        ({"stats_max_tokens": 64}, r"no effect with stats=none"),
        ({"stats_reference": "layer"}, r"stats_reference.*no effect with stats=none"),
        ({"stats": "paper", "stats_reference": "input"}, r"stats_reference='input'.*module \| layer"),
        ({"stats": "paper", "stats_combine": "max"}, r"stats_combine='max'.*mean \| l2 \| sum"),
    ],
)
def test_bad_arguments_name_the_argument(args: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec(**args)


def test_a_large_sigma_is_accepted_below_float32_overflow() -> None:
    """Any sigma > 0 whose draws stay finite in float32: a near one-hot softmax of N(0, sigma^2) logits is a valid
    (extreme) pattern."""
    for sigma in (5000.0, 1e37):
        assert spec(attn="gaussian", attn_dist="normal", attn_sigma=sigma).resolve(4, 8).sigma == sigma
        assert spec(attn="noise_delta", attn_sigma=sigma).resolve(4, 8).sigma == sigma


def test_resolve_defaults_per_mode() -> None:
    gaussian = spec(attn="gaussian").resolve(4, 8)
    assert (gaussian.space, gaussian.rows, gaussian.keys, gaussian.lam, gaussian.dist) == (
        "logits",
        "last",
        "image",
        1.0,
        "dirichlet",
    )
    assert gaussian.layers == (0, 1, 2, 3) and gaussian.heads == HeadSelection("all")
    assert spec(attn="uniform").resolve(4, 8).space == "probs"
    assert spec(attn="identity").resolve(4, 8).keys == "all"
    assert spec(attn="noise_delta").resolve(4, 8).rows == "all"


def test_paper_preset_follows_the_family_and_explicit_args_override() -> None:
    llava = adapter_for(_config("llava"))
    onevision_preset = adapter_for(_config("llava_onevision")).preset(_config("llava_onevision"))
    resolved = spec(attn="gaussian", attn_preset="paper").resolve(32, 32, llava.preset(_config("llava")))
    assert resolved.layers == tuple(range(18, 24)) and resolved.heads.band == (0.3, 0.6)
    assert spec(attn="gaussian", attn_preset="paper").resolve(28, 14, onevision_preset).layers == tuple(range(21, 28))
    generic = spec(attn="gaussian", attn_preset="paper").resolve(12, 8, FamilyPreset())
    assert generic.layers == tuple(range(1, 12)) and generic.heads.band == (0.3, 0.9)
    override = spec(attn="gaussian", attn_preset="paper", attn_layers="2", attn_heads="all")
    resolved = override.resolve(32, 32, llava.preset(_config("llava")))
    assert resolved.layers == (2,) and resolved.heads == HeadSelection("all") and resolved.preset == "paper"


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("llava", ("scores", "shared", "pooled")),
        ("llava_next", ("scores", "shared", "pooled")),
        ("llava_onevision", ("scores", "shared", "sides")),
        ("qwen2_vl", ("none", "shared", "pooled")),
        ("qwen2_5_vl", ("none", "shared", "pooled")),
        ("gemma3", ("none", "shared", "pooled")),
    ],
)
def test_paper_preset_sets_the_released_rule_per_family(model_type: str, expected: tuple[str, str, str]) -> None:
    config = _config(model_type)
    preset = adapter_for(config).preset(config)
    resolved = spec(attn="gaussian", attn_preset="paper", attn_layers="1:").resolve(32, 32, preset)
    assert (resolved.scale, resolved.draw, resolved.head_score) == expected
    explicit = spec(attn="gaussian", attn_preset="paper", attn_layers="1:", attn_scale="none", attn_draw="per_head")
    assert (explicit.resolve(32, 32, preset).scale, explicit.resolve(32, 32, preset).draw) == ("none", "per_head")
    assert spec(attn="gaussian", attn_layers="1:").resolve(32, 32, preset).scale == "none"  # no preset, no rescale


def test_head_score_needs_a_head_band() -> None:
    with pytest.raises(SpecError, match=r"attn_head_score=sides ranks heads for a pA-B band.*attn_heads=all"):
        spec(attn="gaussian", attn_head_score="sides").resolve(4, 4)
    assert spec(attn="gaussian", attn_heads="p0-1", attn_head_score="sides").resolve(4, 4).head_score == "sides"


def test_preset_outside_a_small_model_asks_for_explicit_layers() -> None:
    with pytest.raises(SpecError, match=r"attn_preset=paper selects layers 18-23.*layers 0-3.*attn_layers"):
        spec(attn="gaussian", attn_preset="paper").resolve(4, 4, FamilyPreset(layers="18-23"))


def test_head_indices_checked_against_the_model() -> None:
    with pytest.raises(SpecError, match=r"attn_heads=.*0-3"):
        spec(attn="uniform", attn_heads="0,4").resolve(2, 4)


def test_layer_syntax_errors_before_the_model_is_known_name_no_layer_count() -> None:
    with pytest.raises(SpecError, match=r"attn_layers='1\.5'.*a list like 18,19,20$"):
        spec(attn="uniform", attn_layers="1.5")


@pytest.mark.parametrize(
    ("num_heads", "band", "keeps"),
    [  # head k of H sits at rank quantile k/(H-1), a single head at 0
        (1, "p0-0.01", True),
        (1, "p0.3-0.6", False),
        (2, "p0.3-0.9", False),  # quantiles 0 and 1
        (2, "p0.95-1", True),
        (3, "p0.5-0.5", True),  # 1/2, on both bounds
        (3, "p0.3-0.3", False),
        (4, "p0.3-0.6", True),  # 1/3
        (4, "p0.5-0.5", False),  # between 1/3 and 2/3
        (11, "p0.3-0.3", True),  # 3/10
        (40, "p0.3-0.3", False),  # 11/39 < 0.3 < 12/39
    ],
)
def test_a_head_band_resolves_exactly_when_it_holds_a_heads_rank_quantile(
    num_heads: int, band: str, keeps: bool
) -> None:
    """A band resolves when some head's rank quantile lies in it, and ``band_heads`` then keeps some head; a band
    between two quantiles is refused, naming the quantiles."""
    scores = torch.randn(1, num_heads, 1, 6, generator=torch.Generator().manual_seed(num_heads))
    allowed = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    visual = torch.tensor([False, True, True, True, False, False])
    assert bool(band_heads(scores, allowed, visual, parse_heads(band).band).any()) == keeps
    if keeps:
        assert spec(attn="uniform", attn_heads=band).resolve(2, num_heads).heads == parse_heads(band)
    else:
        with pytest.raises(SpecError, match=rf"attn_heads='{band}'.*{num_heads} heads sit at rank quantiles"):
            spec(attn="uniform", attn_heads=band).resolve(2, num_heads)


def test_preset_band_holding_no_head_asks_for_explicit_heads() -> None:
    with pytest.raises(SpecError, match=r"attn_preset=paper selects heads p0.3-0.6.*2 heads.*attn_heads"):
        spec(attn="gaussian", attn_preset="paper").resolve(4, 2, FamilyPreset(layers="1:", heads="p0.3-0.6"))
    explicit = spec(attn="gaussian", attn_preset="paper", attn_heads="all")
    assert explicit.resolve(4, 2, FamilyPreset(layers="1:", heads="p0.3-0.6")).heads == HeadSelection("all")


def _hash(intervention: Intervention) -> str:
    return spec_hash(intervention, StatsConfig())


def test_hash_is_stable_and_tracks_every_choice() -> None:
    first = spec(attn="gaussian", attn_layers="1,2").resolve(4, 4)
    again = spec(attn_layers="[1,2]", attn="GAUSSIAN").resolve(4, 4)
    assert _hash(first) == _hash(again) and len(_hash(first)) == 12
    variants = [
        spec(attn="gaussian", attn_layers="1,2", attn_seed=1),
        spec(attn="gaussian", attn_layers="1,2", attn_lambda=0.5),
        spec(attn="gaussian", attn_layers="1,3"),
        spec(attn="gaussian", attn_layers="1,2", attn_space="probs"),
        spec(attn="uniform", attn_layers="1,2"),
        spec(attn="gaussian", attn_layers="1,2", attn_scale="scores"),
        spec(attn="gaussian", attn_layers="1,2", attn_draw="shared"),
        spec(attn="gaussian", attn_layers="1,2", attn_heads="p0-1", attn_head_score="sides"),
    ]
    assert len({_hash(first), *(_hash(v.resolve(4, 4)) for v in variants)}) == 9
    assert _hash(spec(attn="none").resolve(4, 4)) == _hash(spec().resolve(32, 32))  # no edit, whatever the model
    # The canonical form, written out: changing it (a field, a value's spelling, the JSON layout) changes every hash
    # and would orphan earlier results.
    args = spec(attn="gaussian", attn_layers="1,2", attn_heads="p0.3-0.6", attn_seed=7, stats="paper")
    canonical = {
        "intervention": {
            "mode": "gaussian", "layers": [1, 2], "heads": "p0.3-0.6", "space": "logits", "rows": "last",
            "keys": "image", "lam": 1.0, "dist": "dirichlet", "sigma": 1.0, "seed": 7, "preset": None,
            "scale": "none", "draw": "per_head", "head_score": "pooled",
        },
        "stats": {
            "stats": "paper", "stats_groups": ["all"], "stats_max_tokens": 1024, "stats_reference": "module",
            "stats_combine": "mean",
        },
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    assert spec_hash(args.resolve(4, 4), args.stats) == hashlib.sha256(text.encode()).hexdigest()[:12]


def test_spellings_of_one_setting_share_a_hash() -> None:
    """Settings that compute the same numbers, spelt differently, share the record's hash; the table's group still
    tells image,text from text,image."""
    def hashed(**args: object) -> str:
        given = spec(**args)
        return spec_hash(given.resolve(4, 4), given.stats)

    assert hashed(attn="uniform", attn_heads="0,1,2,3") == hashed(attn="uniform")
    assert spec(attn="uniform", attn_heads="0,1,2,3").resolve(4, 4).heads == HeadSelection("all")
    assert hashed(attn="uniform", attn_heads="0,1,2") != hashed(attn="uniform")
    assert hashed(stats="paper", stats_groups="image,all") == hashed(stats="paper", stats_groups="all,image")
    assert hashed(stats="paper", stats_groups="text,image") != hashed(stats="paper", stats_groups="image,text")
    assert hashed(stats="paper", stats_groups="image,text,all") == hashed(stats="paper", stats_groups="all,text,image")
    assert hashed(stats="released") == hashed(stats="paper", stats_reference="layer", stats_combine="l2")


def test_head_bands_are_recorded_exactly() -> None:
    """Bands that keep different heads never share a record (and hash); every record reads back as its band."""
    close = [spec(attn="gaussian", attn_heads=band).resolve(4, 4) for band in ("p0.3333333-1", "p0.3333334-1")]
    assert close[0].heads.describe() != close[1].heads.describe() and _hash(close[0]) != _hash(close[1])
    for band in ("p0.3-0.9", "p0-1", "p0.00001-0.9", "p0.3333333-1"):
        recorded = parse_heads(band).describe()
        assert parse_heads(recorded) == parse_heads(band) and "e" not in recorded
    assert parse_heads("p0.3-0.6").describe() == "p0.3-0.6" and parse_heads("p0-1").describe() == "p0-1"
    assert _hash(spec(attn="gaussian", attn_lambda="-0").resolve(4, 4)) == _hash(
        spec(attn="gaussian", attn_lambda=0).resolve(4, 4))


@pytest.mark.parametrize("host", ["lmms_eval", "lm_eval"])
def test_model_args_read_by_either_hosts_parser_resolve_alike(host: str) -> None:
    """Each host types ``model_args`` values its own way (lmms-eval reads ``-1`` as a float, lm-eval ``none`` as
    None): the spec is the same, and an explicit ``attn_scale=none`` overrides the paper preset's."""
    parse = importlib.import_module(f"{host}.utils").simple_parse_args_string
    args = parse("attn=gaussian,attn_preset=paper,attn_scale=none,attn_layers=-1,attn_lambda=0.5")
    resolved = InterventionSpec.from_model_args(args).resolve(32, 32, adapter_for(_config("llava")).preset(
        _config("llava")))
    assert resolved.scale == "none" and resolved.layers == (31,) and resolved.lam == 0.5


def test_stats_definitions_default_per_kind_and_enter_the_spec_hash() -> None:
    def stats(**args: object) -> StatsConfig:
        return spec(**args).stats

    assert (stats(stats="paper").reference, stats(stats="paper").combine) == ("module", "mean")
    assert (stats(stats="released").reference, stats(stats="released").combine) == ("layer", "l2")
    assert stats(stats="released", stats_combine="sum").combine == "sum"  # explicit arguments override
    assert stats(stats="all", stats_reference="layer").reference == "layer"
    intervention = spec(attn="gaussian").resolve(4, 4)
    hashes = {
        spec_hash(intervention, config)
        for config in (
            stats(stats="paper"),
            stats(stats="paper", stats_combine="l2", stats_reference="layer"),
            stats(stats="paper", stats_combine="l2"),
            stats(stats="paper", stats_reference="layer"),
            StatsConfig(),
        )
    }
    assert len(hashes) == 5
    assert spec_hash(intervention, stats(stats="paper")) == spec_hash(intervention, stats(stats="PAPER"))


def _config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def test_list_values_given_as_json_lists_read_item_by_item() -> None:
    """lm-eval's JSON ``--model_args`` hand a list over as a list, not as its text."""
    assert spec(stats="paper", stats_groups=["all", "text"]) == spec(stats="paper", stats_groups="all,text")
    assert spec(attn="uniform", attn_heads=[0, 5]) == spec(attn="uniform", attn_heads="0,5")
