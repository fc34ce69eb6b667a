"""A misspelt plugin argument is refused by name with the closest one ("did you mean"), and only names that look
like the plugin's are taken from the base class's arguments."""

from __future__ import annotations

import pytest

from lmms_lostattn.config.spec import InterventionSpec, SpecError
from lmms_lostattn.model_wrappers.common.plugin import bracket_list_values, is_plugin_arg

BASE_ARGS = {"pretrained": None, "device": None, "attn_implementation": None, "kwargs": None}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"atn": "gaussian"}, r"unknown argument\(s\) atn \(did you mean attn\?\); accepted: attn, attn_space"),
        ({"attn_layer": "1"}, r"attn_layer \(did you mean attn_layers\?\); accepted"),
        ({"stat": "paper", "stats_group": "image"}, r"stat \(did you mean stats\?\), stats_group \(did you mean "),
        ({"attn_zzzzzzzz": "1"}, r"unknown argument\(s\) attn_zzzzzzzz; accepted"),
        ({"attn_seed ": "1"}, r"unknown argument\(s\) 'attn_seed ' \(did you mean attn_seed\?\)"),
    ],
)
def test_unknown_arguments_name_the_closest_one(args: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        InterventionSpec.from_model_args(args)


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("attn", True),
        ("atn", True),
        ("stat", True),
        ("stats_group", True),
        ("attn_layer", True),
        ("Attn", True),  # a base class that drops unknown **kwargs would ignore it silently
        ("STATS", True),
        ("attn_implementation", False),  # the base class's
        ("device", False),
        ("max_new_tokens", False),  # left to the base class's **kwargs: not as close to stats_max_tokens as a typo
        ("seed", False),  # nor to attn_seed
    ],
)
def test_near_misses_go_to_the_plugin(key: str, ours: bool) -> None:
    assert is_plugin_arg(key, BASE_ARGS) is ours


def test_a_plugin_argument_given_twice_is_refused() -> None:
    """Both hosts' parsers would keep the last value without a word; the base class's own arguments are its own."""
    def split(text: str) -> list[str]:
        return text.split(",")

    with pytest.raises(SpecError, match=r"^lostattn: attn_layers given more than once in model_args"):
        bracket_list_values("attn_layers=1,attn=uniform,attn_layers=all", split)
    bracketed = bracket_list_values("device=cpu,attn_layers=1,2,device=cpu", split)
    assert bracketed == "device=cpu,attn_layers=[1,2],device=cpu"


@pytest.mark.parametrize("arg_string", ["device=cpu,use_cache=True,attn_seed:3", "attn:uniform,device=cpu"])
def test_a_piece_without_a_value_is_refused_unless_it_continues_a_plugin_list(arg_string: str) -> None:
    """Glued onto a base-class argument it would change that argument's value without a word."""
    with pytest.raises(SpecError, match=r"in model_args has no '='.*write each argument as name=value"):
        bracket_list_values(arg_string, lambda text: text.split(","))


def test_a_misspelt_list_argument_keeps_its_list_so_the_spec_names_the_misspelling() -> None:
    assert bracket_list_values("attn_layer=1,2,Stats_groups=all,text", lambda text: text.split(",")) == (
        "attn_layer=[1,2],Stats_groups=[all,text]"
    )


@pytest.mark.parametrize("arg_string", ["attn=gaussian,attn_layers=²", "attn=gaussian,attn_seed=١", "atn_layers=٣"])
def test_a_plugin_value_that_is_not_ascii_is_refused_before_the_hosts_parser(arg_string: str) -> None:
    """lmms-eval's parser calls ``int`` on any ``str.isnumeric`` value: ``²`` crashed it (exit 1, no argument named),
    ``١`` became 1."""
    from lmms_eval.utils import _smart_comma_split

    with pytest.raises(SpecError, match=r"=\S+ is not valid; accepted: ASCII text"):
        bracket_list_values(arg_string, _smart_comma_split)
    assert bracket_list_values("pretrained=/models/modèle,attn=uniform", _smart_comma_split) == (
        "pretrained=/models/modèle,attn=uniform"
    )
