"""Every contact point with an upstream internal, the tested version ranges, and ``lostattn doctor``.

The parametrised contact-point test is the one that fails, with the contact point's name, when transformers or
lmms-eval moves an internal; the rest show that each guard fails loudly instead of guessing.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys
import tomllib

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_attention
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from transformers import DynamicCache, LlavaForConditionalGeneration

from lmms_lostattn.cli import main
from lmms_lostattn.cli.doctor import doctor, kernels_lines
from lmms_lostattn.compat import contacts, internals, kernels, versions
from lmms_lostattn.compat.versions import UpstreamError
from lmms_lostattn.config.spec import InterventionSpec
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.contacts import CONTACT_POINTS
from lmms_lostattn.intervention.kernel import route_attention, text_config_key
from lmms_lostattn.intervention.scope import intervene
from lmms_lostattn.model_wrappers.lm_eval.contacts import CONTACT_POINTS as LM_EVAL_POINTS
from lmms_lostattn.model_wrappers.lmms_eval.contacts import CONTACT_POINTS as HOST_POINTS
from lmms_lostattn.testing import FAMILY_VARIANTS, make_tiny_model

ALL_POINTS = (*CONTACT_POINTS, *HOST_POINTS, *LM_EVAL_POINTS)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("point", ALL_POINTS, ids=[point.name for point in ALL_POINTS])
def test_contact_point_holds(point: contacts.ContactPoint) -> None:
    problem = point.problem()
    assert problem is None, problem


def test_a_broken_contact_point_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def heads_first(module, query, *args, **kwargs):  # the output left as (B, H, Q, D)
        out, weights = sdpa_forward(module, query, *args, **kwargs)
        return out.transpose(1, 2), weights

    sdpa_forward = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", heads_first)
    point = next(p for p in CONTACT_POINTS if p.name.endswith("sdpa_attention_forward"))
    problem = point.problem()
    assert problem is not None and "sdpa_attention_forward" in problem and "transformers" in problem


@pytest.mark.parametrize("package", ["lm_eval", "lmms_eval"])
def test_a_changed_default_aggregation_is_named(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """A release whose registry aggregates a metric otherwise by default than the reports assume fails its contact
    point, naming the registry."""
    registry = importlib.import_module(f"{package}.api.registry")
    importlib.import_module(f"{package}.api.metrics")
    aggregations = dict(registry.METRIC_AGGREGATION_REGISTRY.items())
    monkeypatch.setattr(registry, "METRIC_AGGREGATION_REGISTRY", aggregations | {"exact_match": aggregations["f1"]})
    point = next(p for p in ALL_POINTS if p.name == f"{package}.api.registry default aggregations (report, compare, "
                                                   "check)")
    problem = point.problem()
    assert problem is not None and "'exact_match': 'f1'" in problem, problem


def test_a_missing_internal_is_named_with_the_version() -> None:
    with pytest.raises(
        UpstreamError, match=r"transformers\.integrations\.sdpa_attention\.no_such_kernel \(transformers 5\."
    ):
        internals.internal("transformers.integrations.sdpa_attention", "no_such_kernel")


def test_a_forward_input_is_found_by_name_or_position_and_else_named() -> None:
    layer, stream = torch.nn.Linear(2, 2), torch.ones(1, 2)
    assert internals.forward_input(layer, (), {"hidden_states": stream}, "hidden_states") is stream
    assert internals.forward_input(layer, (stream,), {}, "hidden_states") is stream
    with pytest.raises(UpstreamError, match=r"Linear\.forward \(transformers 5\..*its input as hidden_states="):
        internals.forward_input(layer, (), {"x": stream}, "hidden_states")


def test_the_cache_is_found_under_either_tested_name() -> None:
    cache = DynamicCache()
    assert internals.forward_cache({"cache": cache}) is cache
    assert internals.forward_cache({"past_key_values": cache}) is cache
    assert internals.forward_cache({"input_ids": torch.ones(1, 2)}) is None


@pytest.mark.parametrize(
    "kwargs", [{"kv_cache": DynamicCache()}, {"cache": DynamicCache(), "past_key_values": DynamicCache()}]
)
def test_a_cache_under_another_name_or_two_caches_are_refused(kwargs: dict) -> None:
    with pytest.raises(UpstreamError, match="KV-cache argument"):
        internals.forward_cache(kwargs)


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny_model("llava", text_layers=2)
    return model, processor


def _scope_args(model):
    text = model.config.get_text_config()
    intervention = InterventionSpec.from_model_args({"attn": "uniform", "attn_keys": "all"}).resolve(
        text.num_hidden_layers, text.num_attention_heads
    )
    return model, intervention, adapter_for(model.config)


def test_a_decoding_step_whose_cache_is_hidden_is_refused(tiny) -> None:
    """A forward at positions > 0 with no cache under a known name (how transformers 5.24 looked to the tracker
    when it read only ``past_key_values``) is not taken for a new one-token prompt."""
    model, _ = tiny
    with intervene(*_scope_args(model)) as scope:
        ids = torch.tensor([[5, 6, 7]])
        scope.before_forward(model, (), {"input_ids": ids, "position_ids": torch.arange(3)[None]})
        with pytest.raises(UpstreamError, match=r"positions >= 3 under one of \('cache', 'past_key_values'\)"):
            scope.before_forward(model, (), {"input_ids": ids[:, -1:], "position_ids": torch.tensor([[3]])})


def test_a_cache_that_disagrees_with_the_tracked_prompt_is_refused(tiny) -> None:
    model, _ = tiny
    with intervene(*_scope_args(model)) as scope:
        scope.before_forward(model, (), {"input_ids": torch.tensor([[5, 6, 7]])})
        cache = DynamicCache()
        cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
        with pytest.raises(UpstreamError, match="the 3 positions the scope has seen, it holds 5"):
            scope.before_forward(model, (), {"input_ids": torch.tensor([[8]]), "cache": cache})


def test_a_forward_without_a_cache_parameter_is_refused_before_anything_attaches(tiny, monkeypatch) -> None:
    model, _ = tiny
    monkeypatch.setattr(internals, "KV_CACHE_KWARGS", ("kv_cache",))
    refused = r"LlavaForConditionalGeneration\.forward .* named one of \('kv_cache',\)"
    with pytest.raises(UpstreamError, match=refused), intervene(*_scope_args(model)):
        pass
    assert not model._forward_pre_hooks


# -- versions ------------------------------------------------------------------------------------------------------


def test_the_declared_ranges_bound_transformers_and_torch_and_pin_the_host() -> None:
    declared = {req.name: req.specifier for req in versions.tested_requirements()}
    assert str(declared["lmms-eval"]) == "==0.7.3"
    assert all(declared["transformers"].contains(tested) for tested in ("5.23.0", "5.24.0", "5.25.0"))
    assert not declared["transformers"].contains("5.26.0") and not declared["transformers"].contains("5.22.2")
    assert all(declared["torch"].contains(tested) for tested in ("2.14.1", "2.15.0"))
    assert not declared["torch"].contains("2.16.0") and not declared["torch"].contains("2.13.0")
    assert not declared["filelock"].contains("4.3.1")


def test_every_declared_range_ends_and_holds_the_locked_version() -> None:
    """A new major release of any dependency is untested until the suite has run on it: every range the package
    declares ends (or pins one release), and the version the lock holds (what the suite passed on) lies in it."""
    pins = (line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    lock = {canonicalize_name(name): version for name, version in pins}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tools = [Requirement(line) for line in extras["test"] if Requirement(line).name != versions.DISTRIBUTION]
    for requirement in (*versions.tested_requirements(), *tools):
        locked = lock[canonicalize_name(requirement.name)]
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), requirement
        assert requirement.specifier.contains(locked), (requirement, locked)


def test_a_version_outside_its_range_names_package_and_range(monkeypatch: pytest.MonkeyPatch,
                                                              logged_warnings: list[str]) -> None:
    monkeypatch.delenv(versions.ALLOW_UNTESTED, raising=False)  # the refusal is tested, also under the override
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "5.99.0" if name == "transformers" else real(name))
    versions.require_tested_versions.cache_clear()
    try:
        problems = versions.version_problems()
        assert problems == [
            f"transformers 5.99.0 is installed; lmms-lostattn is tested with transformers{_declared('transformers')}"
        ]
        with pytest.raises(UpstreamError, match=r"transformers 5\.99\.0 is installed.*pip install .*'transformers"):
            versions.require_tested_versions()
        versions.require_tested_versions.cache_clear()
        monkeypatch.setenv(versions.ALLOW_UNTESTED, "1")
        import lmms_eval.utils  # noqa: F401  (it silences the warnings module on import)

        versions.require_tested_versions()
        assert any("running outside the tested versions: transformers 5.99.0" in m for m in logged_warnings)
    finally:
        versions.require_tested_versions.cache_clear()


def test_the_lm_eval_pin_holds_where_lm_eval_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval comes with an extra: another release installed is refused like any upstream; none installed is fine."""
    real = versions.installed
    for found, expected in (("0.4.14", ["lm-eval 0.4.14 is installed; lmms-lostattn is tested with lm-eval==0.4.13"]),
                            (None, [])):
        monkeypatch.setattr(versions, "installed", lambda name, found=found: found if name == "lm-eval" else real(name))
        assert versions.version_problems() == expected
        assert ("'lm-eval==0.4.13'" in versions.install_command()) is (found is not None)


def _declared(name: str) -> str:
    return str(next(req.specifier for req in versions.tested_requirements() if Requirement(str(req)).name == name))


# -- lostattn doctor -----------------------------------------------------------------------------------------------


def test_doctor_says_supported_here(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    untested = versions.version_problems()  # only under LOSTATTN_ALLOW_UNTESTED=1 (conftest stops the run otherwise)
    assert out.rstrip().endswith(f"({versions.ALLOW_UNTESTED}=1)" if untested else "supported") and "FAILED" not in out
    assert f"transformers {versions.installed('transformers')}" in out
    assert "tiny LLaVA loaded here (cpu): use_kernels=" in out and "kernelizes at load by default" in out


def test_doctor_fails_with_a_clear_line_when_a_contact_point_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that knows the KV cache only under the other release's name (as this one did before transformers
    5.24 support, when it read only ``past_key_values``)."""
    parameters = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    other_release = tuple(name for name in internals.KV_CACHE_KWARGS if name not in parameters)
    monkeypatch.setattr(internals, "KV_CACHE_KWARGS", other_release)
    lines: list[str] = []
    assert doctor(echo=lines.append) == 1
    failed = [line for line in lines if line.lstrip().startswith("FAILED")]
    assert failed and all("KV-cache" in line for line in failed), failed
    assert lines[-1].startswith("NOT supported") and "pip install" not in lines[-1]  # the versions are the tested ones


@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allowed-untested"])
def test_doctor_on_an_untested_version_says_what_to_install_or_that_it_runs_untested(
    monkeypatch: pytest.MonkeyPatch, allowed: bool
) -> None:
    """The maintainer's routine (.ci/latest) runs doctor on the newest releases with LOSTATTN_ALLOW_UNTESTED=1: an
    untested version is then a line of its own, not a failure, so that only a moved internal fails."""
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "2.99.0" if name == "torch" else real(name))
    if allowed:
        monkeypatch.setenv(versions.ALLOW_UNTESTED, "1")
    else:
        monkeypatch.delenv(versions.ALLOW_UNTESTED, raising=False)
    lines: list[str] = []
    assert doctor(echo=lines.append) == (0 if allowed else 1)
    torch_line = next(line for line in lines if "torch 2.99.0" in line)
    if allowed:
        assert torch_line.startswith("  untested torch 2.99.0 is installed") and not any("FAILED" in x for x in lines)
        assert lines[-1] == ("works here, untested: 1 version(s) outside the tested ranges "
                             f"({versions.ALLOW_UNTESTED}=1)")
    else:
        assert torch_line.startswith("  FAILED   torch 2.99.0 is installed")
        assert lines[-1].startswith("NOT supported: 1 problem(s) above. Install the tested versions: pip install")


def test_doctor_counts_a_missing_dependency_even_when_untested_versions_are_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LOSTATTN_ALLOW_UNTESTED=1 allows a version outside its range, not a package that is not there (a
    ``pip install --no-deps .``): that stays a problem, with what to install."""
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: None if name == "decord" else real(name))
    monkeypatch.setattr("lmms_lostattn.cli.doctor.installed", versions.installed)
    monkeypatch.setenv(versions.ALLOW_UNTESTED, "1")
    lines: list[str] = []
    assert doctor(echo=lines.append) == 1
    assert any(line.startswith("  FAILED   decord is not installed") for line in lines), lines
    assert lines[-1].startswith("NOT supported: 1 problem(s) above. Install the tested versions: pip install")


def test_doctor_on_an_offline_gpu_says_only_cached_kernels_load(monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    monkeypatch.setattr("lmms_lostattn.cli.doctor.accelerator_load", lambda: "cuda")
    monkeypatch.setattr("lmms_lostattn.cli.doctor.kernels_by_default", lambda: True)
    monkeypatch.setattr("lmms_lostattn.cli.doctor.hub_offline", lambda: True)
    lines, problems = kernels_lines(tiny[0])
    assert problems == 0 and lines[-1] == (
        "  ok       cuda: offline (HF_HUB_OFFLINE): a load here runs the hub kernels in the local cache; missing ones "
        "fall back to PyTorch's layers"
    )


@pytest.mark.skipif(not kernels.DEFAULT_ON_FROM.release <= Version(versions.installed("transformers")).release,
                    reason="this transformers has no hub-kernels switch")
def test_doctor_names_a_moved_kernels_internal_and_still_runs_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels as kernels_library

    monkeypatch.delattr(kernels_library, "get_kernelized_layers")
    lines: list[str] = []
    assert doctor(echo=lines.append) == 1
    failed = [line for line in lines if line.lstrip().startswith("FAILED")]
    assert len(failed) == 2 and all("get_kernelized_layers" in line for line in failed), failed  # point and record
    assert any(line.lstrip().startswith("ok       attn=") for line in lines), lines  # the end-to-end part ran


def test_doctor_reports_an_internal_the_mechanism_resolves_on_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention functions' module resolves transformers' mask functions when it loads: one that moved is a
    FAILED line of the report (the versions are still listed, the verdict still printed), not a traceback."""
    import transformers.masking_utils

    monkeypatch.delattr(transformers.masking_utils, "sdpa_mask")
    for module in ("lmms_lostattn.intervention.contacts", "lmms_lostattn.intervention.kernel"):
        monkeypatch.delitem(sys.modules, module)
    lines: list[str] = []
    assert doctor(echo=lines.append) == 1
    failed = [line for line in lines if line.lstrip().startswith("FAILED")]
    assert failed[0].startswith("  FAILED   the intervention's modules: UpstreamError: ") and "sdpa_mask" in failed[0]
    assert any(line.startswith("  ok       transformers ") for line in lines) and lines[-1].startswith("NOT supported")


def test_doctor_catches_a_tracker_that_takes_decoding_steps_for_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the cache never found (and positions not checked), every cached step would be a new prompt: the
    end-to-end run must see it (statistics on several passes, or edits that differ from recomputation)."""
    monkeypatch.setattr(internals, "forward_cache", lambda kwargs: None)
    monkeypatch.setattr("lmms_lostattn.intervention.prompt.refuse_hidden_cache", lambda position_ids: None)
    lines: list[str] = []
    assert doctor(echo=lines.append) == 1
    assert any(line.lstrip().startswith("FAILED   attn=") for line in lines), lines


# -- what the scope needs of every family's model files ---------------------------------------------------------


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_every_family_has_what_the_scope_needs(variant: str) -> None:
    """Each model file's eager kernel and KV-cache parameter; ``set_attn_implementation`` routes the language
    model only and is undone on exit."""
    model, _ = make_tiny_model(variant, text_layers=2)
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    internals.check_model(model, [adapter.attention_module(layer) for layer in layers], eager=True)
    config = model.config

    def implementations() -> dict[str, str]:  # per sub-config; a text LLM's own config is its text config ("")
        configs = {name: getattr(config, name) for name in config.sub_configs} or {"": config}
        return {name: sub._attn_implementation for name, sub in configs.items()}

    before = implementations()
    text_key = text_config_key(model)
    with route_attention(model):
        assert implementations() == {**before, text_key: "lostattn" if before[text_key] == "sdpa" else "lostattn_eager"}
    assert implementations() == before
