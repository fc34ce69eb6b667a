"""Every supported LVLM family against lmms-eval's own wrapper for it, on a tiny random-weight model.

Each family in :data:`FAMILIES` gets the same checks: ``attn=none`` parity with the base wrapper (texts and float32
logits), image/video positions equal to the family processor's token ids, every edit changing the logits of the
family's model, finite ``stats=paper`` values for every layer, the paper preset, and through the lmms-eval command
line (``-m cli``) ``attn=none`` and an edit of each kind (every mode for LLaVA-1.5), each edit moving the
statistics. README's support matrix is rendered from this table; after adding a family, regenerate it with
``python tests/test_families.py``.

lmms-eval's Qwen, Gemma 3 and InternVL wrappers load models in bfloat16 (hard-coded) and the plugin keeps that (the
parity test checks it loads in the base's dtype), so the tests move *both* the base and the plugin model to float32
after construction, where 1e-5 logit agreement is meaningful.
"""

from __future__ import annotations

import math
import pathlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np
import pytest
import torch
from cli_helpers import pope_argv, results_of, run_cli_batch, run_error, samples_of
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from lmms_lostattn.config.spec import ATTN_MODES, FamilyPreset, InterventionSpec
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.scope import intervene
from lmms_lostattn.model_wrappers.lmms_eval.hf import HuggingfaceImageTextToText, MediaArgumentsProcessor

MODES = ["none", "gaussian", "uniform", "identity", "sink", "shuffle", "knockout", "noise_delta", "noise_qkv"]
POPE_METRICS = {"pope_accuracy,none", "pope_f1_score,none", "pope_precision,none", "pope_recall,none"}
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Family:
    """One row of the support matrix: a tiny model variant, the plugin's model id and lmms-eval's base id."""

    name: str
    variant: str  # lmms_lostattn.testing factory variant
    model_id: str
    base_id: str
    kinds: tuple[str, ...]  # lmms-eval classes wrapped: "chat" and/or "simple"
    preset: FamilyPreset
    cpu_args: dict[str, object] = field(default_factory=dict)
    video: bool = False  # the processor takes videos (positions are checked for them too)
    image_token: str = "image_token_id"  # the processor attribute with the id of the image-patch token
    stats_args: dict[str, object] = field(default_factory=lambda: {"attn_preset": "paper"})
    # What the parity test runs as the base when lmms-eval's own class cannot run (lmms-eval's generic
    # ``huggingface`` on transformers 5): that class with only the fixes the plugin's class applies.
    parity_base: type | None = None
    # Why the plugin does not follow the base class's batches (it then runs one request at a time), or the condition
    # under which it does; the README's "batches under the plugin" column
    batch_note: str = ""

    @property
    def test_id(self) -> str:
        return f"{self.model_id.removeprefix('lostattn_')}-{self.variant}"

    @property
    def model_args(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.cpu_args.items())


_CPU = {"device": "cpu", "device_map": "cpu"}
_LLAVA_CPU = {**_CPU, "dtype": "float32"}
_QWEN_CPU = {**_CPU, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
_LLAVA_STATS = {"attn_preset": "paper", "attn_layers": "1:"}  # the paper's layers 18-23 / 21-27 exceed 4 layers
_BATCH_ONE = "its class runs batch size 1"
_TOKENIZER_PADS = "it pads as its tokenizer says: a right-padded batch is refused"

FAMILIES = [
    Family("Qwen2.5-VL", "qwen2_5_vl", "lostattn_qwen2_5_vl", "qwen2_5_vl", ("chat", "simple"),
           FamilyPreset("1:", "p0.3-0.9"), _QWEN_CPU, video=True),
    Family("Qwen2-VL", "qwen2_vl", "lostattn_qwen2_vl", "qwen2_vl", ("simple",),
           FamilyPreset("1:", "p0.3-0.9"), _QWEN_CPU, video=True, batch_note=_TOKENIZER_PADS),
    Family("Qwen3-VL", "qwen3_vl", "lostattn_qwen3_vl", "qwen3_vl", ("chat", "simple"),
           FamilyPreset("1:", "p0.3-0.9"), _QWEN_CPU, video=True),
    Family("LLaVA-1.5", "llava", "lostattn_llava", "llava_hf", ("chat", "simple"),
           FamilyPreset("18-23", "p0.3-0.6", scale="scores"), _LLAVA_CPU, stats_args=_LLAVA_STATS,
           batch_note=_BATCH_ONE),
    Family("LLaVA-NeXT", "llava_next", "lostattn_llava", "llava_hf", ("chat", "simple"),
           FamilyPreset("18-23", "p0.3-0.6", scale="scores"), _LLAVA_CPU, stats_args=_LLAVA_STATS,
           batch_note=_BATCH_ONE),
    Family("LLaVA-OneVision", "llava_onevision", "lostattn_llava", "llava_hf", ("chat", "simple"),
           FamilyPreset("21-27", "p0.3-0.6", scale="scores", head_score="sides"), _LLAVA_CPU, stats_args=_LLAVA_STATS,
           batch_note=_BATCH_ONE),
    Family("Gemma 3", "gemma3", "lostattn_gemma3", "gemma3", ("simple",), FamilyPreset("1:", "p0.3-0.9"), _CPU,
           image_token="tokenizer.image_token_id"),  # Gemma 3's processor.image_token_id is BOI, not the soft token
    Family("InternVL (HF)", "internvl", "lostattn_internvl", "internvl_hf", ("chat",), FamilyPreset("1:", "p0.3-0.9"),
           {**_CPU, "max_patches": 4}, batch_note=_BATCH_ONE),
    Family("Idefics2", "idefics2", "lostattn_idefics", "idefics2", ("simple",), FamilyPreset("1:", "p0.3-0.9"),
           {**_CPU, "dtype": "float32"}, batch_note=_TOKENIZER_PADS),
    Family("Mistral 3 (Pixtral)", "mistral3", "lostattn_mistral3_vl", "mistral3_vl", ("simple",),
           FamilyPreset("1:", "p0.3-0.9"), _CPU, batch_note="its class generates each prompt of a batch alone"),
    Family("LLaVA-1.5, generic HF", "llava", "lostattn_hf", "huggingface", ("chat",),
           FamilyPreset("18-23", "p0.3-0.6", scale="scores"), _CPU, stats_args=_LLAVA_STATS,
           parity_base=HuggingfaceImageTextToText, batch_note=_TOKENIZER_PADS),
    Family("Qwen2.5-VL, generic HF", "qwen2_5_vl", "lostattn_hf", "huggingface", ("chat",),
           FamilyPreset("1:", "p0.3-0.9"), _CPU, video=True, parity_base=HuggingfaceImageTextToText,
           batch_note=_TOKENIZER_PADS),
    Family("Idefics3, generic HF", "idefics3", "lostattn_hf", "huggingface", ("chat",), FamilyPreset("1:", "p0.3-0.9"),
           _CPU, parity_base=HuggingfaceImageTextToText, batch_note=_TOKENIZER_PADS),
]
FAMILY_IDS = [family.test_id for family in FAMILIES]
PARITY = [pytest.param(family, kind, id=f"{family.test_id}-{kind}") for family in FAMILIES for kind in family.kinds]

DOCS = [
    {"question": "Is there a red circle in the image?", "image": Image.new("RGB", (96, 96), (200, 40, 40))},
    {"question": "Is there a blue star?", "image": Image.new("RGB", (64, 80), (30, 60, 210))},
]


def _requests(kind: str) -> list[Instance]:
    gen_kwargs = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}

    def to_messages(doc: dict) -> list[dict]:
        image = {"type": "image", "url": doc["image"]}
        return [{"role": "user", "content": [image, {"type": "text", "text": doc["question"]}]}]

    requests = []
    for doc_id, doc in enumerate(DOCS):
        args = (
            (doc["question"], dict(gen_kwargs), lambda d: [d["image"]], doc_id, "toy", "test")
            if kind == "simple"
            else (doc["question"], to_messages, dict(gen_kwargs), doc_id, "toy", "test")
        )
        requests.append(
            Instance("generate_until", args, 0, {"task": "toy", "doc_id": doc_id, "repeats": 1, "split": "test"})
        )
    return requests


def _load(model: str | type, kind: str, path: pathlib.Path, family: Family, **args: object):
    """An lmms-eval model instance of ``model``'s ``kind`` class (or of ``model`` itself), ready for the toy requests,
    moved to float32 (several lmms-eval wrappers hard-code bfloat16); ``lm.loaded_dtype`` is the dtype it loaded in."""
    model_class = get_model(model, force_simple=kind == "simple") if isinstance(model, str) else model
    lm = model_class(pretrained=str(path), **family.cpu_args, **args)
    lm.loaded_dtype = lm.model.dtype
    lm.model.to(torch.float32)
    lm.task_dict = {"toy": {"test": DOCS}}
    return lm


def _texts(lm, kind: str) -> list[str]:
    return [getattr(output, "text", output) for output in lm.generate_until(_requests(kind))]


def _inputs(processor, video: bool = False) -> dict[str, torch.Tensor]:
    """One prompt with an image (and a 4-frame video) through the family's own processor and chat template."""
    content = [{"type": "image"}, *([{"type": "video"}] if video else []), {"type": "text", "text": "Is it red?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    media = {"images": [DOCS[0]["image"]]}
    if video:
        frames = np.stack([np.full((64, 64, 3), 40 * i, dtype=np.uint8) for i in range(4)])
        media["videos"] = [frames]
    return processor(text=[text], return_tensors="pt", **media)


@pytest.mark.parametrize(("family", "kind"), PARITY)
def test_attn_none_matches_the_lmms_eval_wrapper(
    tiny_model: Callable[[str], pathlib.Path], family: Family, kind: str
) -> None:
    path = tiny_model(family.variant)
    base = get_model(family.base_id, force_simple=kind == "simple")
    ours = get_model(family.model_id, force_simple=kind == "simple")
    assert issubclass(ours, base) and ours.is_simple == (kind == "simple")
    if family.parity_base is not None:
        assert issubclass(ours, family.parity_base) and issubclass(family.parity_base, base)
    base_lm = _load(family.parity_base or family.base_id, kind, path, family)
    our_lm = _load(family.model_id, kind, path, family, attn="none")
    assert our_lm.loaded_dtype == base_lm.loaded_dtype  # the plugin loads exactly as lmms-eval does
    expected = _texts(base_lm, kind)
    assert _texts(our_lm, kind) == expected and any(expected)
    inputs = _inputs(AutoProcessor.from_pretrained(path))
    with torch.no_grad():
        torch.testing.assert_close(our_lm.model(**inputs).logits, base_lm.model(**inputs).logits, atol=1e-5, rtol=0)
    implementation = base_lm.model.config.get_text_config()._attn_implementation
    assert our_lm.model.config.get_text_config()._attn_implementation == implementation


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_visual_positions_are_the_processors_image_and_video_tokens(
    tiny_model: Callable[[str], pathlib.Path], family: Family
) -> None:
    path = tiny_model(family.variant)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = _inputs(processor, video=family.video)
    token_ids = [attrgetter(family.image_token)(processor)] + ([processor.video_token_id] if family.video else [])
    expected = torch.isin(inputs["input_ids"], torch.tensor(token_ids))
    for token_id in token_ids:
        assert (inputs["input_ids"] == token_id).sum() > 0
    adapter = adapter_for(model.config)
    intervention = InterventionSpec.from_model_args({"attn": "uniform"}).resolve(len(adapter.decoder_layers(model)), 4)
    with torch.no_grad(), intervene(model, intervention, adapter) as scope:
        model(**inputs)
        found = scope.state.is_visual
    assert torch.equal(found, expected)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_every_mode_edits_the_familys_model(tiny_model: Callable[[str], pathlib.Path], family: Family) -> None:
    """Each of :data:`MODES` but none, on the family's own model and processor (image and video tokens): finite
    float32 logits that differ from the unedited ones by more than 1e-6. Measured (2026-12-05): an edit that changes
    nothing (``attn=uniform,attn_lambda=0``) moves them by at most 2e-7 (its kernel is not sdpa's); the smallest edit,
    uniform or shuffle over Idefics2's near-identical image tokens, by 5e-6."""
    path = tiny_model(family.variant)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = _inputs(AutoProcessor.from_pretrained(path), video=family.video)
    adapter, text = adapter_for(model.config), model.config.get_text_config()
    with torch.no_grad():
        base = model(**inputs).logits
        for mode in MODES[1:]:
            intervention = InterventionSpec.from_model_args({"attn": mode}).resolve(
                len(adapter.decoder_layers(model)), text.num_attention_heads
            )
            with intervene(model, intervention, adapter):
                edited = model(**inputs).logits
            assert torch.isfinite(edited).all() and (edited - base).abs().max() > 1e-6, mode


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_paper_preset_is_the_familys(tiny_model: Callable[[str], pathlib.Path], family: Family) -> None:
    config = AutoConfig.from_pretrained(tiny_model(family.variant))
    assert adapter_for(config).preset(config) == family.preset


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_stats_paper_are_finite_for_every_layer(tiny_model: Callable[[str], pathlib.Path], family: Family) -> None:
    args = {"attn": "gaussian", "stats": "paper", **family.stats_args}
    lm = _load(family.model_id, family.kinds[0], tiny_model(family.variant), family, **args)
    text = lm.model.config.get_text_config()
    spec = InterventionSpec.from_model_args({k: v for k, v in args.items() if k.startswith("attn")})
    assert lm.lostattn.intervention == spec.resolve(text.num_hidden_layers, text.num_attention_heads, family.preset)
    _texts(lm, family.kinds[0])
    for doc_id in range(len(DOCS)):
        (record,) = lm.lostattn.run.records[("toy", doc_id)]
        for module in ("attn", "ffn"):
            for metric in ("rid", "mixig"):
                values = record["values"][module]["all"][metric]
                assert len(values) == text.num_hidden_layers
                assert all(value is not None and math.isfinite(value) for value in values), (module, metric, values)


def _cli_modes(family: Family) -> dict[str, str]:
    """The modes a family runs through the command line, each with its arguments: every mode for LLaVA-1.5; for the
    others attn=none and one edit of each kind: knockout of the image keys in every row (the attention-weight modes
    share one kernel), noise_delta and noise_qkv. Every family's model runs every mode in process
    (:func:`test_every_mode_edits_the_familys_model`)."""
    if family.name == "LLaVA-1.5":
        return {mode: f"attn={mode}" for mode in MODES}
    return {"none": "attn=none", "knockout": "attn=knockout,attn_rows=all", "noise_delta": "attn=noise_delta",
            "noise_qkv": "attn=noise_qkv"}


def _cli_tolerance(family: Family) -> float:
    """How far an edit must move some per-layer statistic of the attn=none run through the command line. Measured
    (2026-12-05): an edit that changes nothing (attn=uniform,attn_lambda=0) moves them by at most 2.4e-7 in runs
    the arguments keep in float32, 4.8e-4 in those the base class loads in bfloat16 (Gemma 3); the smallest edits
    above move them by 1.8e-4 (LLaVA-1.5, shuffle) and 5.3e-3 (Gemma 3, knockout)."""
    return 1e-5 if family.cpu_args.get("dtype") == "float32" else 2e-3


def _per_layer(sample: dict) -> list[float]:
    values = sample["lostattn_layers"]["values"]
    return [v for module in ("attn", "ffn") for metric in ("rid", "mixig") for v in values[module]["all"][metric]]


@pytest.fixture(scope="module")
def cli_outputs(tiny_model: Callable[[str], pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Each family's :func:`_cli_modes` through the lmms-eval command line with ``stats=paper``, in two subprocesses
    (one lmms-eval import and task index each, ~2 s per run after that); run ``<family>/<mode>`` writes under
    ``<returned dir>/<family>/<mode>``."""
    root = tmp_path_factory.mktemp("cli")
    runs = [
        pope_argv(
            family.model_id,
            f"pretrained={tiny_model(family.variant)},{family.model_args},{args},stats=paper",
            root / family.test_id / mode,
            "--log_samples",
        )
        for family in FAMILIES
        for mode, args in _cli_modes(family).items()
    ]
    run_cli_batch(runs, root, processes=2)
    return root


@pytest.mark.cli
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_its_modes_run_through_the_lmms_eval_cli_and_edits_move_the_statistics(
    cli_outputs: pathlib.Path, family: Family
) -> None:
    """Each mode's run succeeds with POPE's metrics and records its mode; each edit moves some per-layer statistic of
    attn=none's run beyond float noise (:func:`_cli_tolerance`): an edit that does nothing fails."""
    stats = {}
    for mode in _cli_modes(family):
        output = cli_outputs / family.test_id / mode
        assert not run_error(output), f"attn={mode}:\n{run_error(output)}"
        results = results_of(output)
        assert set(results["results"]["lostattn_pope"]) >= POPE_METRICS, mode
        assert results["lostattn"]["intervention"]["mode"] == mode
        samples = samples_of(output, "lostattn_pope")
        assert [sample["doc_id"] for sample in samples] == [0, 1], mode
        stats[mode] = np.array([_per_layer(sample) for sample in samples])
    for mode in set(stats) - {"none"}:
        moved = float(np.abs(stats[mode] - stats["none"]).max())
        assert moved > _cli_tolerance(family), f"attn={mode} moved attn=none's statistics by {moved:.1e} at most"


@pytest.mark.parametrize("model_id", ["lostattn_qwen2_5_vl", "lostattn_hf"])
@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda transformers: transformers.MllamaConfig(), r"gated cross-attention"),
        (lambda transformers: transformers.BertConfig(), r"'bert' is not supported\."),
        (lambda transformers: transformers.LlavaConfig(text_config=transformers.GptOssConfig()), r"learned sinks"),
    ],
    ids=["mllama", "unknown", "llava-on-gpt-oss"],
)
def test_unsupported_models_are_refused_before_loading(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, config: Callable, reason: str, model_id: str
) -> None:
    import transformers

    config(transformers).save_pretrained(tmp_path)

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the architecture was checked")

    for auto_class in ("Qwen2_5_VLForConditionalGeneration", "AutoModelForImageTextToText", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, auto_class), "from_pretrained", no_load)
    families = r"Supported: .*llava \(llava/llava_next/llava_onevision\), .*qwen \(qwen2_vl/qwen2_5_vl/qwen3_vl\)"
    with pytest.raises(ValueError, match=rf"{reason}.*{families}.*Adding a family"):
        get_model(model_id)(pretrained=str(tmp_path), **_CPU, attn="gaussian")


def test_an_adapter_registered_for_an_unfit_family_is_used() -> None:
    """UNFIT explains why no shipped adapter claims a model type; an adapter registered for it (a third party's) wins,
    as for a model of its own type; the language model of a vision-language model is still checked."""
    import transformers

    from lmms_lostattn.families import FAMILIES, FamilyAdapter, UnsupportedFamilyError, adapter_for

    mine = FamilyAdapter(family="mine", model_types=("gpt_oss",), images=False)
    FAMILIES.register(mine)
    try:
        assert adapter_for(transformers.GptOssConfig()) is mine
    finally:
        FAMILIES.unregister(mine)
    with pytest.raises(UnsupportedFamilyError, match=r"'gpt_oss' is not supported \(its attention adds learned sinks"):
        adapter_for(transformers.GptOssConfig())


def test_lmms_eval_huggingface_fails_on_transformers_5_as_lostattn_hf_says(
    tiny_model: Callable[[str], pathlib.Path],
) -> None:
    """The two failures ``lmms_lostattn/model_wrappers/lmms_eval/hf.py`` fixes; when this fails, lmms-eval fixed them
    and the fixes can go."""
    lm = get_model("huggingface")(pretrained=str(tiny_model("llava")), **_CPU)
    assert type(lm.model).__name__ == "LlavaModel"  # AutoModel: no LM head, no generate()
    assert not hasattr(lm.model, "lm_head") and not hasattr(lm.model, "generate")
    lm.task_dict = {"toy": {"test": DOCS}}
    with pytest.raises(ValueError, match="keyword argument `audios`"):
        lm.generate_until(_requests("chat"))


@pytest.mark.parametrize("variant", ["llava", "qwen2_5_vl"])
def test_the_processor_gets_only_the_media_a_prompt_has(
    tiny_model: Callable[[str], pathlib.Path], variant: str
) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model(variant))
    with pytest.raises(IndexError):  # what lmms-eval's empty lists do to a text-only prompt
        processor(text=["Is it red?"], images=[], return_tensors="pt")
    fixed = MediaArgumentsProcessor(processor)
    inputs = fixed(text=["Is it red?"], images=[], videos=[], audios=[], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], processor(text=["Is it red?"], return_tensors="pt")["input_ids"])
    assert fixed.batch_decode(inputs["input_ids"]) == processor.batch_decode(inputs["input_ids"])


# -- README support matrix ---------------------------------------------------------------------------------------

_MATRIX_START = "<!-- support-matrix: generated by `python tests/test_families.py`; do not edit -->"
_MATRIX_END = "<!-- /support-matrix -->"
_CHECKS = (
    f"`attn=none` parity with the base wrapper (texts, float32 logits to 1e-5), each of the {len(MODES) - 1} edits "
    f"every family runs (all {len(ATTN_MODES) - 1} but the image priors, which need one token per vision patch: "
    "LLaVA-1.5 only) changing its float32 logits, `attn=none` and an edit of each kind (`knockout` in every row, "
    f"`noise_delta`, `noise_qkv`; all {len(MODES)} modes for LLaVA-1.5) through the lmms-eval command line with "
    "`stats=paper`, each edit moving the per-layer statistics beyond float noise, visual-token "
    "positions equal to the processor's token ids, finite `stats=paper` for every layer, the paper preset"
)
_GENERIC = (
    "`lostattn_hf` runs any `model_type` above through lmms-eval's generic `huggingface` chat model (rows \"generic "
    "HF\"). lmms-eval 0.7.3's class does not run on transformers 5.x: its model-class check never matches, so it loads "
    "`AutoModel` (the model without its LM head, which cannot generate), and it passes the processor the removed "
    "`audios=` argument and empty `images`/`videos` lists, which processors reject. `lostattn_hf` fixes only these two "
    "steps (it loads `AutoModelForImageTextToText` and passes only the media a prompt has), and its parity is checked "
    "against lmms-eval's class with the same two fixes. Like that class it loads bfloat16 and has no `loglikelihood`."
)


_BATCHES = (
    "\"Batches under the plugin\": with `attn` or `stats` set and `--batch_size N`, the plugin runs the base class's "
    "own `generate_until` batches (rows named by their documents, statistics per row; each row equals its batch-of-one "
    "run up to the model's own batched float differences, `tests/test_batching.py`); where it says no, it runs one "
    "request at a time. `loglikelihood` runs one request at a time in every class."
)


def _batches(family: Family) -> str:
    """The "batches under the plugin" cell, from the plugin's classes themselves."""
    classes = [get_model(family.model_id, force_simple=kind == "simple") for kind in family.kinds]
    (follows,) = {"generate_until" in model_class.follows_batches for model_class in classes}
    if follows:
        return f"yes ({family.batch_note})" if family.batch_note else "yes"
    assert family.batch_note, f"{family.name}: say why the plugin does not follow its batches"
    return f"no: {family.batch_note}"


def render_matrix() -> str:
    """README's support matrix, from :data:`FAMILIES` (every row is covered by every parametrised test above)."""
    rows = [
        "| family | `--model` | lmms-eval base (classes) | `model_type` tested | visual tokens checked "
        "| `attn_preset=paper` layers / heads / scale, draw, head score | batches under the plugin |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        base = f"`{family.base_id}` ({', '.join(family.kinds)})"
        preset = family.preset
        preset = f"`{preset.layers}` / `{preset.heads}` / `{preset.scale}`, `{preset.draw}`, `{preset.head_score}`"
        visual = "image, video" if family.video else "image"
        rows.append(
            f"| {family.name} | `{family.model_id}` | {base} | `{family.variant}` | {visual} | {preset} "
            f"| {_batches(family)} |"
        )
    footer = f"Every row passes, on a tiny random-weight model of that family: {_CHECKS}."
    return "\n".join([_MATRIX_START, *rows, "", footer, "", _BATCHES, "", _GENERIC, _MATRIX_END])


def _readme_matrix() -> str:
    match = re.search(re.escape(_MATRIX_START) + r".*?" + re.escape(_MATRIX_END), README.read_text(), re.S)
    return match.group(0) if match else ""


def test_readme_support_matrix_is_current() -> None:
    assert _readme_matrix() == render_matrix(), "README's support matrix is stale: run `python tests/test_families.py`"


if __name__ == "__main__":  # regenerate README's support matrix
    text = README.read_text()
    if not _readme_matrix():
        sys.exit(f"no support-matrix markers in {README}")
    README.write_text(text.replace(_readme_matrix(), render_matrix()))
