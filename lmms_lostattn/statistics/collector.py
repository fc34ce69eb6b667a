"""Per-sample residual statistics (SPEC §3) and their aggregation over samples.

A :class:`StatsCollector` is the ``on_layer`` callback of :func:`lmms_lostattn.intervention.scope.intervene`: on each
prefill pass it computes, for every sample of the batch, decoder layer, module (``attn``, ``ffn``) and token group
(``all``, ``image``, ``text``), the metrics of :func:`lmms_lostattn.statistics.metrics.module_stats` on that sample's
non-padding rows.
Only floats are kept. :func:`aggregate` turns a list of per-sample records into per-layer means and stderrs.

A per-sample record is ``{"layers": L, "values": {module: {group: {metric: [value or None per layer]}}}}``; a value
is ``None`` where a group has fewer than two tokens in that sample (e.g. ``image`` on a text-only prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from loguru import logger

from lmms_lostattn.config.spec import StatsConfig
from lmms_lostattn.statistics.inputs import NonFiniteError
from lmms_lostattn.statistics.metrics import (
    Decomposition,
    decompose,
    innovation,
    select_tokens,
    update_stats,
)

MODULES = ("attn", "ffn")
TABLE_METRICS = ("rid", "mixig")


class TokenLayout(Protocol):
    """Where a prompt batch's padding and image tokens are (the intervention's prompt state is one)."""

    first_real: torch.Tensor  # (B,) each sample's first non-padding position
    real_end: torch.Tensor  # (B,) end (exclusive) of each sample's real tokens
    is_visual: torch.Tensor  # (B, T) bool: image tokens


class StatsCollector:
    """Collects the statistics of the samples of one prompt batch (call :meth:`take` after each prompt).

    Per layer, sample and group the collector decomposes each distinct stream once (see
    :class:`lmms_lostattn.statistics.metrics.Decomposition`): the stream after attention, ``x + d_attn`` (as the model
    adds it, in its dtype), is X' of the attention update and X of the FFN update; the stream after the FFN is reused as
    the next layer's X when the recorded input is bit-identical to it (it is not, e.g., where DeepStack adds
    visual features between layers).
    """

    def __init__(self, config: StatsConfig, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self._records: list[dict[str, Any]] = []
        self._layers_seen: set[int] = set()
        # (sample, group) -> (layer, decomposition of the stream after its FFN on the group's capped rows)
        self._carry: dict[tuple[int, str], tuple[int, Decomposition]] = {}

    def __call__(
        self, layer: int, x: torch.Tensor, d_attn: torch.Tensor, d_ffn: torch.Tensor, state: TokenLayout
    ) -> None:
        """Measure one layer of a prefill pass; ``state`` says where padding and image tokens are."""
        if not self._records:
            self._records = [self._empty() for _ in range(x.shape[0])]
        self._layers_seen.add(layer)
        mid = x + d_attn
        out = mid + d_ffn
        starts, ends = state.first_real.tolist(), state.real_end.tolist()  # one host sync per layer, not per sample
        for sample, record in enumerate(self._records):
            real = torch.arange(starts[sample], min(ends[sample], x.shape[1]), device=x.device)
            visual = state.is_visual[sample].to(x.device)[real]  # the layer may sit on another device
            rows = {"all": real, "image": real[visual], "text": real[~visual]}
            for group in self.config.groups:
                index = rows[group]
                if index.numel() < 2:
                    continue
                index = index[select_tokens(index.numel(), self.config.max_tokens).to(index.device)]
                values = self._measure(layer, (sample, group), x[sample, index], mid[sample, index], out[sample, index])
                for module, stats in values.items():
                    for metric, value in stats.items():
                        record["values"][module][group].setdefault(metric, [None] * self.num_layers)[layer] = value

    def _measure(
        self, layer: int, key: tuple[int, str], x: torch.Tensor, mid: torch.Tensor, out: torch.Tensor
    ) -> dict[str, dict[str, float]]:
        """Statistics of both updates of one layer on one sample's rows: X -> mid (attn), mid -> out (ffn)."""
        carried = self._carry.pop(key, None)
        if carried is not None and carried[0] == layer - 1 and _same(carried[1].x, x):
            before = carried[1]
        else:
            before = _decompose_stream(x, "entering", layer, key)
        after_attn = _decompose_stream(mid, "after the attention update of", layer, key)
        after_ffn = _decompose_stream(out, "after the FFN update of", layer, key)
        if layer < self.num_layers - 1:
            self._carry[key] = (layer, after_ffn)
        config = self.config
        kind = "all" if config.kind == "all" else "paper"  # stats=released: the paper's metrics, other definitions
        ffn_reference = before if config.reference == "layer" else None
        ffn = update_stats(after_attn, after_ffn, kind=kind, combine=config.combine, reference=ffn_reference)
        if kind == "all":  # the FFN against the other reference too, from the decompositions already made
            other, name = (after_attn, "module") if config.reference == "layer" else (before, "layer")
            ffn[f"rid_{name}"], _, ffn[f"delta_d_{name}"] = innovation(other, after_ffn, combine=config.combine)
        return {"attn": update_stats(before, after_attn, kind=kind, combine=config.combine), "ffn": ffn}

    def _empty(self) -> dict[str, Any]:
        values = {module: {group: {} for group in self.config.groups} for module in MODULES}
        return {"layers": self.num_layers, "values": values}

    def take(self) -> list[dict[str, Any]]:
        """The records of the last prompt batch, one per sample; resets the collector. A prefill that did not reach
        every layer (an error inside the model that its host wrapper caught, answering without it) gives none: its
        first layers alone would pass for the samples' statistics."""
        records, self._records = self._records, []
        seen, self._layers_seen = self._layers_seen, set()
        self._carry = {}
        if records and len(seen) < self.num_layers:
            logger.warning(f"lostattn: a prefill stopped after {len(seen)} of {self.num_layers} decoder layers (an "
                           "error the model's wrapper caught?); its samples have no statistics")
            return []
        return records


def _same(decomposed: torch.Tensor, stream: torch.Tensor) -> bool:
    """Whether ``stream`` is bit-identical to the rows a decomposition holds, on one device (a model split over
    devices hands the next layer a copy). The decomposition holds them in float32 or float64, which every stream
    dtype converts to exactly, so equal there is equal in the stream's own dtype."""
    return decomposed.device == stream.device and torch.equal(decomposed, stream.to(decomposed.dtype))


def _decompose_stream(stream: torch.Tensor, where: str, layer: int, key: tuple[int, str]) -> Decomposition:
    """:func:`decompose` of one recorded stream; a non-finite stream is an error that says where the model broke."""
    try:
        return decompose(stream)
    except NonFiniteError as error:
        sample, group = key
        raise NonFiniteError(
            f"lostattn stats: the residual stream {where} decoder layer {layer} is not finite (sample {sample} of the "
            f"batch, {group} tokens: {error}), so RID/MixIG are undefined there. The model's own forward pass "
            f"produced it, in {str(stream.dtype).removeprefix('torch.')}: {_remedy(stream.dtype)}"
        ) from error


def _remedy(dtype: torch.dtype) -> str:
    """What to try when the model's own forward gave a non-finite stream in ``dtype``."""
    if dtype == torch.float16:
        return "float16 overflows where bfloat16 and float32 do not; run it in one of them (the base wrapper's dtype "\
               "argument)."
    return "its weights or inputs hold NaN or inf, or produce them."


def table_row(metric: str, module: str, reference: str = "module", combine: str = "mean") -> str:
    """The table row of one module's metric, ``lostattn_{metric}_{module}``, named by what its definition changes
    from the paper's: ``_layer`` (the FFN's RID against the layer's input) and ``_l2`` / ``_sum`` (ΔD's combination)
    follow ``rid``; MixIG has one definition."""
    name = f"lostattn_{metric}_{module}"
    if metric == "rid":
        name += "_layer" if module == "ffn" and reference == "layer" else ""
        name += "" if combine == "mean" else f"_{combine}"
    return name


def table_rows(config: StatsConfig) -> dict[tuple[str, str], str]:
    """``(metric, module) -> row name`` of the table rows under ``config``."""
    return {
        (metric, module): table_row(metric, module, config.reference, config.combine)
        for metric in TABLE_METRICS
        for module in MODULES
    }


def _series(record: dict[str, Any], module: str, group: str, metric: str) -> list[float | None]:
    """One metric's per-layer values in one record (empty when the group or metric was not measured)."""
    return record["values"][module].get(group, {}).get(metric, [])


def layer_mean(record: dict[str, Any], module: str, group: str, metric: str) -> float | None:
    """Mean over layers of one metric of one sample (layers without a value are skipped)."""
    return _mean(_series(record, module, group, metric))


def mean_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of the records of one document's requests (e.g. the options of a multiple-choice doc), over
    the records that measured each value: a request whose group had fewer than two tokens has no value there."""
    if len(records) == 1:
        return records[0]
    values = {module: {group: {} for group in groups} for module, groups in records[0]["values"].items()}
    for module, group, metric in _measured(records):
        columns = zip(*(_series(r, module, group, metric) or [None] * r["layers"] for r in records), strict=True)
        values[module][group][metric] = [_mean(column) for column in columns]
    return {"layers": records[0]["layers"], "values": values}


def _measured(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Every ``(module, group, metric)`` that at least one record has values for, sorted."""
    return sorted(
        {
            (module, group, metric)
            for r in records
            for module, groups in r["values"].items()
            for group, metrics in groups.items()
            for metric in metrics
        }
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n); None for n < 2)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer and layer-averaged mean, stderr and count over samples, for every module x group x metric.

    Returns ``{module: {group: {metric: {"layers": {"mean": [...], "stderr": [...], "n": [...]},
    "overall": {"mean", "stderr", "n"}}}}}``; ``overall`` is taken over the samples' layer means.
    """
    if not records:
        return {}
    num_layers = max(r["layers"] for r in records)
    out: dict[str, Any] = {}
    for module, group, metric in _measured(records):
        columns = [
            [v for r in records if (v := _value(r, module, group, metric, layer)) is not None]
            for layer in range(num_layers)
        ]
        per_layer = [_mean_stderr(column) for column in columns]
        sample_means = [m for r in records if (m := layer_mean(r, module, group, metric)) is not None]
        mean, stderr = _mean_stderr(sample_means)
        out.setdefault(module, {}).setdefault(group, {})[metric] = {
            "layers": {
                "mean": [m for m, _ in per_layer],
                "stderr": [s for _, s in per_layer],
                "n": [len(column) for column in columns],
            },
            "overall": {"mean": mean, "stderr": stderr, "n": len(sample_means)},
        }
    return out


def _value(record: dict[str, Any], module: str, group: str, metric: str, layer: int) -> float | None:
    values = _series(record, module, group, metric)
    return values[layer] if values else None
