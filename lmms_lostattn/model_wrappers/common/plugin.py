"""What every host's glue shares: the plugin's arguments taken out of the host's, resolved against the checkpoint's
config before the weights load, the intervention scope around the host's model, and the run's records.

Nothing here imports a harness: each host folder (``lmms_eval/``, ``lm_eval/``) subclasses its harness's model
classes and calls :meth:`Plugin.from_model_kwargs` in ``__init__`` and :meth:`Plugin.scope` around the passes it
runs.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import get_close_matches
from importlib.metadata import version
from typing import Any

from loguru import logger
from torch import nn
from transformers import AutoConfig, AutoImageProcessor

from lmms_lostattn.compat.kernels import kernels_record, require_reachable_kernels
from lmms_lostattn.compat.versions import require_tested_versions
from lmms_lostattn.config.spec import Intervention, InterventionSpec, SpecError, StatsConfig, spec_hash
from lmms_lostattn.config.values import check_ascii
from lmms_lostattn.families import FamilyAdapter, UnsupportedFamilyError, adapter_for, adapters
from lmms_lostattn.intervention.kernel import ROUTABLE
from lmms_lostattn.intervention.scope import Scope, intervene
from lmms_lostattn.statistics.collector import StatsCollector
from lmms_lostattn.statistics.metrics import RANK_EPS

_PLUGIN_PREFIXES = ("attn", "stats")
# transformers' loading arguments that share our prefixes: a host that forwards ``**kwargs`` to ``from_pretrained``
# (lm-eval's HFLM) takes them without naming them in its signature
LOADING_ARGS = frozenset({"attn_implementation"})
FORWARDS_LOADING_ARGS = frozenset({"lm_eval"})  # hosts whose model classes pass such arguments to from_pretrained
VISION_LANGUAGE_HOSTS = frozenset({"lmms_eval"})  # hosts whose model classes load vision-language checkpoints only
# where in a checkpoint its config is (lm-eval's HFLM arguments, passed on to ``from_pretrained``)
CHECKPOINT_ARGS = ("subfolder", "gguf_file")
NEAR_MISS = 0.8  # difflib's similarity from which a name the base class does not take is a misspelt plugin argument


def bracket_list_values(arg_string: str, split: Callable[[str], list[str]]) -> str:
    """Let list values be written plainly in ``model_args``: ``attn_layers=18,19,20`` -> ``attn_layers=[18,19,20]``.

    Both harnesses split ``model_args`` at commas outside brackets and quotes (``split``: the host's own splitter),
    so a bare ``18,19,20`` would otherwise arrive as stray ``19`` and ``20`` pieces without ``=`` and crash the
    host's parser. A piece without ``=`` after any other argument, and a plugin argument given twice (the hosts'
    parsers keep the last one), are a :class:`SpecError`.
    """
    pieces: list[str] = []
    for piece in split(arg_string.strip()):
        if "=" in piece or not piece.strip():
            pieces.append(piece)
        elif pieces and looks_like_plugin_arg(pieces[-1].partition("=")[0].strip()):
            pieces[-1] += "," + piece
        else:
            after = f"after {pieces[-1]!r}, not" if pieces else "not after"
            raise SpecError(f"lostattn: {piece!r} in model_args has no '=' ({after} a plugin argument, whose value "
                            "could be a list); write each argument as name=value")
    bracketed = []
    for piece in pieces:
        name, _, value = piece.partition("=")
        if looks_like_plugin_arg(name.strip()):
            check_ascii(name.strip(), value.strip())
        if "," in value and value[:1] not in "[{\"'":
            value = f"[{value}]"
        bracketed.append(f"{name}={value}" if _ else piece)
    refuse_repeated([piece.partition("=")[0].strip() for piece in pieces])
    return ",".join(bracketed)


def refuse_repeated(names: list[str]) -> None:
    """A :class:`SpecError` for a plugin argument among ``names`` more than once (the hosts keep the last value)."""
    twice = sorted({name for name in names if names.count(name) > 1 and name in InterventionSpec.ARGS})
    if twice:
        raise SpecError(f"lostattn: {', '.join(twice)} given more than once in model_args; give each once")


def looks_like_plugin_arg(key: str) -> bool:
    """A plugin argument, or a name that looks like one: ``attn*``/``stats*`` in any case and near misses
    (``attn_layer``, ``atn``, ``stat``); not transformers' :data:`LOADING_ARGS` (``attn_implementation``)."""
    lowered = key.lower()
    return key in InterventionSpec.ARGS or key not in LOADING_ARGS and (
        lowered.startswith(_PLUGIN_PREFIXES) or bool(get_close_matches(lowered, InterventionSpec.ARGS, 1, NEAR_MISS))
    )


def is_plugin_arg(key: str, base_args: Mapping[str, Any]) -> bool:
    """The plugin's own arguments, and names the base class does not take that look like ours
    (:func:`looks_like_plugin_arg`), which the spec then refuses by name with the closest argument."""
    return key in InterventionSpec.ARGS or key not in base_args and looks_like_plugin_arg(key)


def refuse_text_model(adapter: FamilyAdapter) -> None:
    """A host whose classes load vision-language checkpoints (lmms-eval) would load a text model's into the wrong
    architecture and fail later, far from the cause."""
    if not adapter.images:
        families = ", ".join(a.family for a in adapters() if a.images)
        raise UnsupportedFamilyError(
            f"lostattn: the checkpoint is a text model (family {adapter.family!r}); lmms-eval's model classes load "
            f"vision-language checkpoints (families {families}). Run it under lm-eval: lostattn-lm-eval --model "
            "lostattn-hf (README: With lm-evaluation-harness)."
        )


def config_overrides(plugin_args: dict[str, Any], pretrained: Any, hub: dict[str, Any]) -> dict[str, Any]:
    """Take out of ``plugin_args`` the names the plugin does not know that the checkpoint's config has
    (``attn_logit_softcapping``): ``from_pretrained`` sets those on the config, so for a host that passes its
    arguments on to it they are the config's, not misspelt plugin arguments. A model given loaded, or a checkpoint
    whose config does not load, keeps them in ``plugin_args``, where the spec refuses them by name."""
    unknown = sorted(set(plugin_args) - set(InterventionSpec.ARGS))
    if not unknown or isinstance(pretrained, nn.Module):
        return {}
    try:
        config = AutoConfig.from_pretrained(pretrained, **hub)
    except (OSError, ValueError):
        return {}
    return {key: plugin_args.pop(key) for key in unknown if hasattr(config, key)}


def check_implementation(kwargs: Mapping[str, Any], base_args: Mapping[str, Any], intervention: Intervention) -> None:
    """An attention-weight edit runs on sdpa or eager only: a :class:`SpecError` before loading for any other
    ``attn_implementation`` given, or defaulted by the base class (lmms-eval's idefics2 picks flash-attention where
    it is installed). One per sub-model (a dict) is left to the scope, which checks the language model's."""
    default = base_args["attn_implementation"].default if "attn_implementation" in base_args else None
    implementation = kwargs.get("attn_implementation", default)
    if isinstance(implementation, dict):
        return
    if intervention.edits_weights and implementation not in (None, inspect.Parameter.empty, *ROUTABLE):
        raise SpecError(f"lostattn: attn={intervention.mode} edits attention weights, which runs on "
                        f"attn_implementation {' or '.join(ROUTABLE)}, not {implementation!r}; give "
                        "attn_implementation=sdpa")


@dataclass
class RunRecords:
    """What one lostattn model contributes to the run's outputs: its settings and, per ``(task, doc_id)``, the
    per-sample statistics records of the rows that served the document."""

    model: str
    host: str  # the harness distribution (``lmms_eval``, ``lm_eval``)
    intervention: Intervention
    stats: StatsConfig
    records: dict[tuple[str, Any], list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    kernels: dict[str, Any] | None = None  # the hub kernels the loaded model runs (compat.kernels.kernels_record)
    # per task, the documents an evaluation selected (lm-eval's --samples), whose requests count positions in it
    selected: dict[str, list[int]] = field(default_factory=dict)

    def document_id(self, task: str, doc_id: Any) -> Any:
        """The document a request's ``doc_id`` names: its position in the task's selection, where there is one."""
        chosen = self.selected.get(task)
        return chosen[doc_id] if chosen else doc_id

    def describe(self) -> dict[str, Any]:
        settings = {
            **self.stats.to_dict(),
            "table_group": self.stats.table_group if self.stats.kind != "none" else None,
            "mixig": {"alpha": 8.0, "agg": "last"},
            "mixig_mean": {"alpha": 1.0, "agg": "mean"} if self.stats.kind == "all" else None,
            "rank_tolerance": f"max(S, H) * {RANK_EPS:.6g} * sigma_max",
            "token_cap_rule": "rows round(i*(S-1)/(cap-1)), i=0..cap-1 (first and last kept) when S > cap",
            "computed_on": "prefill pass of each request, float32, non-padding tokens",
        }
        return {
            "model": self.model,
            "spec_hash": spec_hash(self.intervention, self.stats),
            "intervention": self.intervention.to_dict(),
            "stats": settings,
            "versions": {name: version(name) for name in ("lmms-lostattn", self.host, "torch", "transformers")},
            "kernels": self.kernels,
        }


def run_of(model: Any) -> RunRecords | None:
    """The run of a lostattn model (None for any other model a harness evaluates)."""
    plugin = getattr(model, "lostattn", None)
    return plugin.run if isinstance(plugin, Plugin) else None


@dataclass
class Plugin:
    """The plugin's state on one host model: its family adapter, resolved intervention and statistics settings."""

    adapter: FamilyAdapter
    intervention: Intervention
    stats: StatsConfig
    run: RunRecords
    image_mean_std: tuple[Any, Any] | None = None  # the image processor's normalisation (attn=complexity)

    @classmethod
    def from_model_kwargs(cls, kwargs: dict[str, Any], base_args: Mapping[str, Any], host: str) -> Plugin:
        """Take the plugin's arguments out of ``kwargs`` (the rest goes to the base class) and resolve them against
        the checkpoint's config, before any weights load: every bad argument is an error here, and so is a load
        that would fetch hub kernels from an unreachable hub."""
        require_tested_versions()
        plugin_args = {key: kwargs.pop(key) for key in list(kwargs) if is_plugin_arg(key, base_args)}
        default = base_args["pretrained"].default if "pretrained" in base_args else None
        pretrained = kwargs.get("pretrained", default)
        hub = {"revision": kwargs.get("revision") or "main", "trust_remote_code": bool(kwargs.get("trust_remote_code"))}
        hub |= {name: kwargs[name] for name in CHECKPOINT_ARGS if kwargs.get(name)}
        overrides = config_overrides(plugin_args, pretrained, hub) if host in FORWARDS_LOADING_ARGS else {}
        kwargs |= overrides
        spec = InterventionSpec.from_model_args(plugin_args)
        if isinstance(pretrained, nn.Module):  # lm-eval takes a loaded model too
            config, pretrained = pretrained.config, pretrained.name_or_path
        else:
            config = AutoConfig.from_pretrained(pretrained, **hub, **overrides)
        adapter = adapter_for(config)
        if host in VISION_LANGUAGE_HOSTS:
            refuse_text_model(adapter)
        intervention = adapter.resolve(config, spec)
        check_implementation(kwargs, base_args, intervention)
        image_mean_std = None
        if intervention.mode == "complexity":  # the normalisation it undoes, from the checkpoint's processor
            processor = AutoImageProcessor.from_pretrained(pretrained, **hub)
            image_mean_std = (processor.image_mean, processor.image_std)
        forwarded = host in FORWARDS_LOADING_ARGS or "use_kernels" in base_args  # else the base class ignores it
        use_kernels = kwargs.get("use_kernels") if forwarded else None
        require_reachable_kernels(kwargs.get("device"), kwargs.get("device_map"), use_kernels)
        run = RunRecords(model=str(pretrained), host=host, intervention=intervention, stats=spec.stats)
        logger.info(
            f"lostattn: spec {spec_hash(intervention, spec.stats)}: intervention {intervention.to_dict()}, "
            f"statistics {spec.stats.to_dict()}"
        )
        return cls(adapter, intervention, spec.stats, run, image_mean_std)

    def loaded(self, model: nn.Module) -> None:
        """Record what the base class loaded: the hub kernels its model runs."""
        self.run.kernels = kernels_record(model)

    @property
    def active(self) -> bool:
        """Whether the host's passes need a scope (an intervention or statistics); otherwise they run untouched."""
        return self.intervention.mode != "none" or self.stats.kind != "none"

    @contextmanager
    def scope(self, model: nn.Module) -> Iterator[tuple[Scope, StatsCollector | None]]:
        """The intervention scope on ``model`` with a fresh statistics collector (``None`` without statistics)."""
        collector = None
        if self.stats.kind != "none":
            collector = StatsCollector(self.stats, len(self.adapter.decoder_layers(model)))
        with intervene(model, self.intervention, self.adapter, collector, self.image_mean_std) as scope:
            yield scope, collector
