"""The glue every family wrapper shares: parse the plugin's ``model_args``, scope the intervention per request.

A family wrapper is ``class LostAttnX(LostAttnMixin, <lmms-eval's own class>)`` and nothing more (see llava.py).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from lmms_eval.api.instance import Instance
from loguru import logger
from tqdm import tqdm
from transformers import AutoConfig, AutoImageProcessor

from lmms_lostattn.adapters import adapter_for
from lmms_lostattn.model_wrappers.reporting import Run, begin_run
from lmms_lostattn.scope import intervene
from lmms_lostattn.spec import InterventionSpec, spec_hash
from lmms_lostattn.stats import StatsCollector
from lmms_lostattn.upstream import internal, require_tested_versions

_smart_comma_split = internal("lmms_eval.utils", "_smart_comma_split")
_PLUGIN_PREFIXES = ("attn", "stats")
PROGRESS = "Model Responding (lostattn)"


@contextmanager
def _one_progress_bar(run: Callable[..., Any], total: int, rank: int) -> Iterator[tqdm]:
    """The base class draws a progress bar per call, and is called once per request under an intervention: silence
    the ``tqdm`` of the module that defines ``run`` meanwhile and show one bar over all requests instead."""
    module = sys.modules[run.__func__.__module__]
    original = getattr(module, "tqdm", None)
    bar = tqdm(total=total, disable=rank != 0, desc=PROGRESS)
    if original is not None:
        module.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield bar
    finally:
        if original is not None:
            module.tqdm = original
        bar.close()


def bracket_list_values(arg_string: str) -> str:
    """Let list values be written plainly in ``model_args``: ``attn_layers=18,19,20`` -> ``attn_layers=[18,19,20]``.

    lmms-eval splits ``model_args`` at commas outside brackets and quotes, so a bare ``18,19,20`` would otherwise
    arrive as stray ``19`` and ``20`` pieces without ``=`` and crash its parser.
    """
    pieces: list[str] = []
    for piece in _smart_comma_split(arg_string.strip()):
        if "=" in piece or not pieces:
            pieces.append(piece)
        else:
            pieces[-1] += "," + piece
    bracketed = []
    for piece in pieces:
        name, _, value = piece.partition("=")
        if "," in value and value[:1] not in "[{\"'":
            value = f"[{value}]"
        bracketed.append(f"{name}={value}" if _ else piece)
    return ",".join(bracketed)


def _is_plugin_arg(key: str, base_args: Mapping[str, Any]) -> bool:
    """The plugin's own arguments, and ``attn*``/``stats*`` names the base class does not take (typos of ours, such
    as ``attn_layer``, which the spec then names); the base class keeps its own (``attn_implementation``)."""
    return key in InterventionSpec.ARGS or (key.startswith(_PLUGIN_PREFIXES) and key not in base_args)


class LostAttnMixin:
    """Adds the intervention arguments of SPEC §2 to an lmms-eval model class; everything else is the base class."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
        return super().create_from_arg_string(bracket_list_values(arg_string), additional_config)

    def __init__(self, **kwargs: Any) -> None:
        require_tested_versions()
        base_args = inspect.signature(super().__init__).parameters
        plugin_args = {key: kwargs.pop(key) for key in list(kwargs) if _is_plugin_arg(key, base_args)}
        spec = InterventionSpec.from_model_args(plugin_args)
        pretrained = kwargs.get("pretrained", base_args["pretrained"].default)
        hub = {"revision": kwargs.get("revision", "main"), "trust_remote_code": bool(kwargs.get("trust_remote_code"))}
        config = AutoConfig.from_pretrained(pretrained, **hub)
        self.adapter = adapter_for(config)
        text = config.get_text_config()
        self.intervention = spec.resolve(text.num_hidden_layers, text.num_attention_heads, self.adapter.preset(config))
        self.adapter.check_mode(config, self.intervention.mode)
        self.stats_config = spec.stats
        self._image_mean_std = None
        if self.intervention.mode == "complexity":  # the normalisation it undoes, from the checkpoint's processor
            processor = AutoImageProcessor.from_pretrained(pretrained, **hub)
            self._image_mean_std = (processor.image_mean, processor.image_std)
        super().__init__(**kwargs)
        self._run = Run(model=str(pretrained), intervention=self.intervention, stats=self.stats_config)
        begin_run(self._run)
        logger.info(
            f"lostattn: spec {spec_hash(self.intervention, self.stats_config)}: intervention "
            f"{self.intervention.to_dict()}, statistics {self.stats_config.to_dict()}"
        )

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().generate_until)

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        return self._run_scoped(requests, super().loglikelihood)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Runs unchanged only without an intervention or statistics: the scope does not yet follow one request's
        rounds, and running them unedited would report the learned model's numbers as the intervention's."""
        if self.intervention.mode != "none" or self.stats_config.kind != "none":
            raise NotImplementedError(
                "lostattn: generate_until_multi_round tasks are not supported with attn or stats yet (the request's "
                f"later rounds would run unedited); got attn={self.intervention.mode}, stats={self.stats_config.kind}. "
                "Run them with attn=none,stats=none, or pick generate_until / loglikelihood tasks."
            )
        return super().generate_until_multi_round(requests)

    def _run_scoped(self, requests: list[Instance], run: Callable[[list[Instance]], list[Any]]) -> list[Any]:
        """Run the base class one request at a time inside one intervention scope (nothing stays attached)."""
        measure = self.stats_config.kind != "none"
        if self.intervention.mode == "none" and not measure:
            return run(requests)
        layers = len(self.adapter.decoder_layers(self.model))
        collector = StatsCollector(self.stats_config, layers) if measure else None
        results: list[Any] = []
        with (
            intervene(self.model, self.intervention, self.adapter, collector, self._image_mean_std) as scope,
            _one_progress_bar(run, len(requests), self.rank) as progress,
        ):
            for request in requests:
                task, split = request.task_name, request.metadata.get("split")
                scope.set_samples([f"{task}/{split}/{request.doc_id}"])
                results.extend(run([request]))
                scope.raise_pending()  # the base class logs and swallows errors raised inside generate()
                if collector is not None:
                    records = collector.take()
                    if records and not request.metadata.get("__padding_only__"):
                        self._run.records[(task, request.doc_id)].append(records[0])
                progress.update(1)
        return results
