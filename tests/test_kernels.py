"""transformers' hub kernels: the plugin loads as its base class does, records what ran, and refuses a GPU load
that would wait on an unreachable hub."""

from __future__ import annotations

import inspect
import pathlib
import socket

import pytest
import torch
from huggingface_hub import constants
from lm_eval.models.huggingface import HFLM
from lmms_eval.models.simple.llava_hf import LlavaHf
from packaging.version import Version
from transformers import AutoModelForImageTextToText

from lmms_lostattn.compat import kernels
from lmms_lostattn.compat.versions import installed
from lmms_lostattn.model_wrappers.common.plugin import Plugin
from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaSimple

DEFAULT_ON = Version(installed("transformers")) >= kernels.DEFAULT_ON_FROM


def _closed_port() -> int:
    """A local port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gpu_load_with_hub_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that would run on a GPU, with the hub endpoint refusing connections."""
    monkeypatch.setattr(kernels, "accelerator_load", lambda device=None, device_map=None: "cuda")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)


@pytest.mark.parametrize(("value", "kernelized"), [("0", False), ("NO", False), ("1", True), (None, True)])
def test_the_default_follows_transformers_load(
    tiny_llava: pathlib.Path, monkeypatch: pytest.MonkeyPatch, value: str | None, kernelized: bool
) -> None:
    """``kernels_by_default`` says what ``from_pretrained`` without ``use_kernels`` then does."""
    if value is None:
        monkeypatch.delenv(kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV, value)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    assert kernels.kernels_by_default() == model.use_kernels == (kernelized and DEFAULT_ON)
    record = kernels.kernels_record(model)
    assert record == {"use_kernels": model.use_kernels, kernels.ENV: value, "layers": {}}  # nothing swapped on CPU


def test_the_record_counts_each_kernel_layer(tiny_llava: pathlib.Path) -> None:
    """The layers the ``kernels`` library lists for a kernelized model (it marks each swapped module with its
    repository), counted per kernel layer."""
    repository = pytest.importorskip("kernels").LayerRepository
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    model._use_kernels = True
    norms = [module for name, module in model.named_modules() if name.endswith("layernorm")]
    activations = [module for name, module in model.named_modules() if name.endswith("mlp.act_fn")]
    for modules, layer in ((norms, "LigerRMSNorm"), (activations, "Silu")):
        for module in modules:
            module.__dict__["_kernel_repo"] = repository("kernels-community/x", layer_name=layer, version=1)
    functions = [func for module in model.modules() for func in getattr(module, "_kernel_funcs", {}).values()]
    for func in functions:  # transformers 5.25 attaches the rotary embedding as a kernelized function
        func.__dict__["_kernel_repo"] = repository("kernels-community/x", layer_name="rotary", version=1)
    assert norms and activations and (functions or not DEFAULT_ON)
    expected = {"LigerRMSNorm": len(norms), "Silu": len(activations)}
    assert kernels.kernel_layers(model) == {**expected, **({"rotary": len(functions)} if functions else {})}


def test_accelerator_load_reads_the_hosts_device_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert kernels.accelerator_load() == "cuda"
    assert kernels.accelerator_load("cuda:0", "auto") == "cuda"
    assert kernels.accelerator_load("cpu", "cpu") is None
    assert kernels.accelerator_load(None, "cpu") is None
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert kernels.accelerator_load("cuda") is None


@pytest.mark.skipif(not DEFAULT_ON, reason="this transformers does not kernelize by default")
@pytest.mark.usefixtures("gpu_load_with_hub_down")
def test_a_gpu_load_needing_an_unreachable_hub_is_refused_before_the_weights(tiny_llava: pathlib.Path) -> None:
    base_args = inspect.signature(LlavaHf.__init__).parameters
    with pytest.raises(kernels.HubKernelsError, match=r"127\.0\.0\.1.* is unreachable.*USE_HUB_KERNELS=0"):
        Plugin.from_model_kwargs({"pretrained": str(tiny_llava), "attn": "gaussian"}, base_args, "lmms_eval")
    # lmms-eval's llava_hf does not pass use_kernels on: its load kernelizes by default whatever the argument says
    with pytest.raises(kernels.HubKernelsError, match="by default"):
        Plugin.from_model_kwargs({"pretrained": str(tiny_llava), "use_kernels": False}, base_args, "lmms_eval")
    lm_eval_args = {"pretrained": str(tiny_llava), "use_kernels": False, "attn": "gaussian"}  # hf passes it on
    Plugin.from_model_kwargs(lm_eval_args, inspect.signature(HFLM.__init__).parameters, "lm_eval")


@pytest.mark.skipif(not DEFAULT_ON, reason="this transformers does not kernelize by default")
@pytest.mark.usefixtures("gpu_load_with_hub_down")
def test_kernels_off_or_the_offline_cache_need_no_hub(monkeypatch: pytest.MonkeyPatch, logged_warnings: list[str]
                                                     ) -> None:
    monkeypatch.setenv(kernels.ENV, "0")
    kernels.require_reachable_kernels()
    kernels.require_reachable_kernels(use_kernels=True)  # transformers reads the variable first
    monkeypatch.delenv(kernels.ENV)
    kernels.require_reachable_kernels(use_kernels=False)
    for text in ("False", "no", " off"):  # from_pretrained reads any text as true
        with pytest.raises(kernels.HubKernelsError, match=f"use_kernels={text!r} turns hub kernels on"):
            kernels.require_reachable_kernels(use_kernels=text)
    with pytest.raises(kernels.HubKernelsError, match="with use_kernels=True"):
        kernels.require_reachable_kernels(use_kernels=True)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    import lmms_eval.utils  # noqa: F401  (it silences the warnings module on import)

    kernels.require_reachable_kernels()
    assert any("kernels missing from the local cache fall back to PyTorch's layers" in m for m in logged_warnings)


def test_the_wrapper_records_what_its_base_class_loaded(tiny_llava: pathlib.Path) -> None:
    """The results' environment block holds the kernels of the model the base class loaded."""
    args = {"pretrained": str(tiny_llava), "device": "cpu", "device_map": "cpu", "dtype": "float32"}
    lm = LostAttnLlavaSimple(**args, attn="gaussian")
    base = LlavaHf(**args)
    assert lm.lostattn.run.describe()["kernels"] == kernels.kernels_record(base.model)
    assert lm.lostattn.run.describe()["kernels"]["use_kernels"] == base.model.use_kernels


@pytest.mark.skipif(not DEFAULT_ON, reason="this transformers has no hub-kernels switch")
@pytest.mark.parametrize("release", ["5.25.0rc1", "5.25.0.dev0", "5.25.1"])
def test_pre_releases_of_the_first_kernelizing_transformers_kernelize(
    monkeypatch: pytest.MonkeyPatch, release: str
) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "installed", lambda name: release)
    assert kernels.kernels_by_default()
    monkeypatch.setattr(kernels, "installed", lambda name: "5.24.9")
    assert not kernels.kernels_by_default()


def test_the_hub_is_probed_as_huggingface_hub_reaches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through huggingface_hub's own HTTP session (its proxies included), not a bare connection: a host that only a
    proxy reaches is reachable."""
    import huggingface_hub.utils

    asked: list[str] = []

    class Session:
        def head(self, url: str, timeout: float) -> None:
            asked.append(url)
            if "down" in url:
                raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    monkeypatch.setattr(constants, "ENDPOINT", "http://only-through-the-proxy.invalid")
    assert kernels.hub_problem() is None and asked == ["http://only-through-the-proxy.invalid"]
    monkeypatch.setattr(constants, "ENDPOINT", "http://down.invalid")
    assert kernels.hub_problem() == "http://down.invalid is unreachable (ConnectionError: no route)"
