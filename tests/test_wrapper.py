"""``lostattn_llava`` against lmms-eval's own ``llava_hf``: registration, parity, bad input, errors, the CLI."""

from __future__ import annotations

import inspect
import pathlib

import pytest
from cli_helpers import lmms_eval_argv, run_cli_batch, run_error, samples_of
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as LlavaHfSimple
from PIL import Image
from transformers import LlavaForConditionalGeneration

from lmms_lostattn.config.spec import InterventionSpec, SpecError, spec_hash
from lmms_lostattn.intervention.attention import EditedAttention
from lmms_lostattn.intervention.scope import InterventionError
from lmms_lostattn.model_wrappers.common.plugin import Plugin, check_implementation
from lmms_lostattn.model_wrappers.lmms_eval import reporting as lmms_eval_reporting
from lmms_lostattn.model_wrappers.lmms_eval.base import LostAttnMixin, bracket_list_values
from lmms_lostattn.model_wrappers.lmms_eval.manifests import get_manifests
from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnLlavaChat, LostAttnLlavaSimple
from lmms_lostattn.tasks import tasks_path

CPU = {"device": "cpu", "device_map": "cpu", "dtype": "float32"}
DOCS = [
    {"question": "Is there a red circle in the image?", "image": Image.new("RGB", (48, 48), (200, 40, 40))},
    {"question": "Is there a blue star?", "image": Image.new("RGB", (48, 48), (30, 60, 210))},
]


@pytest.mark.parametrize("fails", [False, True])
def test_an_evaluation_keeps_no_statistics_records_after_it(tiny_model, fails: bool) -> None:
    """A document's records are in lmms-eval's per-sample metrics once its evaluation has scored it; the model keeps
    none of them afterwards (a run of thousands of documents), whether the evaluation ended or failed."""
    plugin = Plugin.from_model_kwargs({"pretrained": str(tiny_model("llava")), "stats": "paper"}, {}, "lmms_eval")
    lm = type("Model", (), {"lostattn": plugin})()

    def evaluate(lm: object) -> None:  # lmms-eval's, which generates and scores every document
        lm.lostattn.run.records["task", 0].append({"layers": 1, "values": {}})
        if fails:
            raise RuntimeError("a failed evaluation")

    if fails:
        with pytest.raises(RuntimeError):
            lmms_eval_reporting._evaluate(evaluate, lm)
    else:
        lmms_eval_reporting._evaluate(evaluate, lm)
    assert not plugin.run.records


def test_list_values_can_be_written_plainly() -> None:
    assert bracket_list_values("pretrained=x,attn_layers=18,19,20,attn=gaussian") == (
        "pretrained=x,attn_layers=[18,19,20],attn=gaussian"
    )
    assert bracket_list_values("attn_heads=0,5,7") == "attn_heads=[0,5,7]"
    assert bracket_list_values('a={"k":1,"j":2},b=[1,2],c=3') == 'a={"k":1,"j":2},b=[1,2],c=3'


def test_model_id_resolves_to_chat_and_simple_classes() -> None:
    assert get_model("lostattn_llava") is LostAttnLlavaChat
    assert get_model("lostattn_llava", force_simple=True) is LostAttnLlavaSimple
    assert issubclass(LostAttnLlavaChat, LlavaHfChat) and issubclass(LostAttnLlavaSimple, LlavaHfSimple)


def test_the_model_ids_resolve_whatever_module_is_imported_first() -> None:
    """lmms-eval builds its model registry on its first import, loading the manifests' entry point: a process whose
    first import is the manifests module itself must not leave the registry without the lostattn models."""
    import subprocess
    import sys

    code = ("import lmms_lostattn.model_wrappers.lmms_eval.manifests\n"
            "from lmms_eval.models import get_model\n"
            "print(get_model('lostattn_llava').__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "LostAttnLlavaChat", done.stderr[-2000:]


def _requests(kind: str, doc_ids: list[int]) -> list[Instance]:
    gen_kwargs = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}

    def to_visual(doc: dict) -> list:
        return [doc["image"]]

    def to_messages(doc: dict) -> list[dict]:
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
        return [{"role": "user", "content": content}]

    requests = []
    for doc_id in doc_ids:
        ctx = DOCS[doc_id]["question"]
        args = (
            (ctx, dict(gen_kwargs), to_visual, doc_id, "toy", "test")
            if kind == "simple"
            else (ctx, to_messages, dict(gen_kwargs), doc_id, "toy", "test")
        )
        requests.append(
            Instance("generate_until", args, 0, {"task": "toy", "doc_id": doc_id, "repeats": 1, "split": "test"})
        )
    return requests


def _generate(model_class: type, pretrained: pathlib.Path, kind: str, doc_ids: list[int], **args: object) -> list:
    lm = model_class(pretrained=str(pretrained), **CPU, **args)
    lm.task_dict = {"toy": {"test": DOCS}}
    outputs = lm.generate_until(_requests(kind, doc_ids))
    return [getattr(output, "text", output) for output in outputs], lm


def test_interventions_change_answers_and_record_their_hash(tiny_llava: pathlib.Path) -> None:
    """The run records the hash of the intervention the arguments resolve to, not that of attn=none."""
    args = {"attn": "knockout", "attn_layers": "all", "attn_rows": "all"}
    base, base_lm = _generate(LostAttnLlavaChat, tiny_llava, "chat", [0, 1])
    edited, lm = _generate(LostAttnLlavaChat, tiny_llava, "chat", [0, 1], **args)
    assert edited != base
    text = lm.model.config.get_text_config()
    spec = InterventionSpec.from_model_args(args)
    resolved = spec.resolve(text.num_hidden_layers, text.num_attention_heads)
    assert lm.lostattn.intervention == resolved
    recorded = lm.lostattn.run.describe()["spec_hash"]
    assert recorded == spec_hash(resolved, spec.stats) != base_lm.lostattn.run.describe()["spec_hash"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"attn": "bogus"}, r"attn='bogus'"),
        ({"attn_layer": "1"}, r"unknown argument.*attn_layer"),
        ({"attn": "uniform", "attn_layers": "9"}, r"attn_layers='9'.*layers 0-3"),
        ({"attn": "uniform", "attn_lambda": 2}, r"attn_lambda=2"),
        ({"attn": "gaussian", "attn_preset": "paper"}, r"selects layers 18-23.*layers 0-3"),
        ({"attn": "uniform", "attn_implementation": "flash_attention_2"},
         r"runs on attn_implementation sdpa or eager, not 'flash_attention_2'; give attn_implementation=sdpa"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(
    tiny_llava: pathlib.Path, monkeypatch: pytest.MonkeyPatch, args: dict, message: str
) -> None:
    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", no_load)
    with pytest.raises(SpecError, match=message):
        LostAttnLlavaChat(pretrained=str(tiny_llava), **CPU, **args)


@pytest.mark.parametrize("args", [{"stats": "paper"}, {"attn": "uniform", "attn_keys": "all"}, {"attn": "gaussian"},
                                  {}])
def test_a_text_model_is_refused_before_an_lmms_eval_class_loads_it(tiny_model, monkeypatch, args: dict) -> None:
    """lmms-eval's classes load vision-language checkpoints: a text LLM would load into the wrong architecture (a
    Qwen2.5-VL with its vision tower missing) and fail far from the cause."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lmms_lostattn.families import UnsupportedFamilyError
    from lmms_lostattn.model_wrappers.lmms_eval.wrappers import LostAttnQwen2_5_VLChat

    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", no_load)
    with pytest.raises(UnsupportedFamilyError, match=r"is a text model \(family 'llama'\).*lostattn-lm-eval"):
        LostAttnQwen2_5_VLChat(pretrained=str(tiny_model("llama")), **CPU, **args)


def test_a_base_class_defaulting_to_an_implementation_edits_cannot_run_on_is_refused() -> None:
    """lmms-eval's idefics2 defaults to flash-attention where it is installed; edits need sdpa or eager."""
    base_args = inspect.signature(lambda attn_implementation="flash_attention_2": None).parameters
    edit, noise = (InterventionSpec.from_model_args({"attn": mode}).resolve(4, 4)
                   for mode in ("uniform", "noise_delta"))
    with pytest.raises(SpecError, match="attn=uniform edits attention weights.*not 'flash_attention_2'"):
        check_implementation({}, base_args, edit)
    check_implementation({"attn_implementation": "sdpa"}, base_args, edit)
    check_implementation({"attn_implementation": {"text_config": "sdpa", "vision_config": "eager"}}, base_args, edit)
    check_implementation({}, base_args, noise)  # no attention weights edited


@pytest.mark.parametrize("wrapper", [LostAttnLlavaSimple, LostAttnLlavaChat])
def test_the_base_classes_attn_implementation_argument_passes_through(tiny_llava: pathlib.Path, wrapper) -> None:
    lm = wrapper(pretrained=str(tiny_llava), **CPU, attn_implementation="eager", attn="uniform", attn_layers="1")
    assert lm.model.config.get_text_config()._attn_implementation == "eager"
    assert lm.lostattn.intervention.mode == "uniform" and lm.lostattn.intervention.layers == (1,)


def test_errors_inside_generate_are_raised_not_swallowed(
    tiny_llava: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llava_hf logs exceptions from generate() and answers ""; an intervention that fails must surface instead."""

    def broken(*_: object, **__: object) -> None:
        raise InterventionError("attention failed")

    monkeypatch.setattr(EditedAttention, "attend", broken)
    with pytest.raises(InterventionError, match="attention failed"):
        _generate(LostAttnLlavaSimple, tiny_llava, "simple", [0, 1], attn="gaussian")


@pytest.fixture(scope="module")
def cli_answers(tiny_llava: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], list]:
    """``(doc_id, filtered answer)`` of 4 documents per ``(model, --force_simple)``: lmms-eval's ``llava_hf`` and
    ``lostattn_llava`` with ``attn=none``, the chat and the simple class, one after another in one lmms-eval
    process (``llava_hf`` first)."""
    root = tmp_path_factory.mktemp("cli")
    model_args = f"pretrained={tiny_llava},device=cpu,device_map=cpu,dtype=float32"
    runs = {}
    for model, extra in [("llava_hf", ""), ("lostattn_llava", ",attn=none")]:
        for simple in (False, True):
            flags = ["--log_samples", *(["--force_simple"] if simple else [])]
            output = root / f"{model}-{'simple' if simple else 'chat'}"
            runs[model, simple] = lmms_eval_argv(model, model_args + extra, output, *flags, limit=4)
    run_cli_batch(list(runs.values()), root)
    answers = {}
    for key, argv in runs.items():
        output = pathlib.Path(argv[argv.index("--output_path") + 1])
        assert not run_error(output), run_error(output)
        answers[key] = [(s["doc_id"], s["filtered_resps"]) for s in samples_of(output, "lostattn_pope")]
    return answers


@pytest.mark.cli
@pytest.mark.parametrize("simple", [False, True])
def test_cli_attn_none_answers_exactly_like_llava_hf(cli_answers: dict[tuple[str, bool], list], simple: bool) -> None:
    expected = cli_answers["llava_hf", simple]
    assert cli_answers["lostattn_llava", simple] == expected and len(expected) == 4


def test_tasks_give_a_lostattn_model_the_prompts_they_give_the_model_it_wraps(
    tiny_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """lmms-eval tasks pick model-specific prompts by the model's id (mmmu's ``qwen3_vl:`` entry): ``lostattn_llava``
    gets ``llava_hf``'s, so that ``attn=none`` runs what the base model runs."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    colour = (tasks_path() / "lostattn_shapes_color.yaml").read_text()
    assert "lmms_eval_specific_kwargs:\n  default:" in colour
    task = colour.replace("task: lostattn_shapes_color", "task: per_model_color").replace(
        "lmms_eval_specific_kwargs:\n", 'lmms_eval_specific_kwargs:\n  llava_hf:\n    pre_prompt: ""\n'
        '    post_prompt: " Answer as llava_hf is asked."\n'
    )
    (tmp_path / "per_model_color.yaml").write_text(task)
    LostAttnLlavaChat(pretrained=str(tiny_llava), **CPU)  # lmms-eval builds the model before the tasks
    prompts = {}
    for model in ("llava_hf", "lostattn_llava", "llava_onevision"):
        manager = TaskManager(include_path=str(tmp_path), include_defaults=False, model_name=model)
        built = get_task_dict(["per_model_color"], manager)
        prompts[model] = built["per_model_color"].lmms_eval_specific_kwargs["post_prompt"]
    assert prompts["lostattn_llava"] == prompts["llava_hf"] == " Answer as llava_hf is asked."
    assert prompts["llava_onevision"] != prompts["llava_hf"]  # any other model keeps its own (the default)


def test_multi_round_tasks_are_refused_under_an_intervention_and_delegated_without(tiny_llava: pathlib.Path) -> None:
    requests = _requests("simple", [0])
    edited = LostAttnLlavaSimple(pretrained=str(tiny_llava), **CPU, attn="uniform")
    with pytest.raises(NotImplementedError, match=r"lostattn: generate_until_multi_round .*attn=uniform, stats=none"):
        edited.generate_until_multi_round(requests)
    measured = LostAttnLlavaSimple(pretrained=str(tiny_llava), **CPU, stats="paper")
    with pytest.raises(NotImplementedError, match=r"lostattn: .*attn=none, stats=paper"):
        measured.generate_until_multi_round(requests)
    plain = LostAttnLlavaSimple(pretrained=str(tiny_llava), **CPU)
    with pytest.raises(NotImplementedError, match=r"^TODO: Implement multi-round generation for LLaVAHF$"):
        plain.generate_until_multi_round(requests)  # llava_hf's own answer


def test_every_registered_wrapper_routes_each_request_type_through_the_plugin() -> None:
    names, checked = ("generate_until", "loglikelihood", "generate_until_multi_round"), []
    for manifest in get_manifests():
        for path in filter(None, (manifest.simple_class_path, manifest.chat_class_path)):
            wrapper = get_model(manifest.model_id, force_simple=path == manifest.simple_class_path)
            assert all(getattr(wrapper, name) is getattr(LostAttnMixin, name) for name in names), path
            checked.append(path)
    assert any("Qwen2_5_VL" in path for path in checked) and len(checked) >= 10
