"""Tests for the tiny-model factory in ``lmms_lostattn.testing``."""

from __future__ import annotations

import pathlib
import re
import socket

import pytest
import torch
from PIL import Image

from lmms_lostattn import testing
from lmms_lostattn.testing import FAMILY_VARIANTS, build_tiny_model, tiny_model_dir

PROMPT = "Is there a cat?"
EXPECTED_PROMPT = "USER: <image>\nIs there a cat? ASSISTANT:"
# (width, height) -> image tokens. LLaVA-1.5: 4x4 patches of a 32x32 crop, CLS dropped ("default" strategy).
# LLaVA-NeXT: 16 base tokens + any-res grid features (incl. one newline token per row) after unpadding.
IMAGE_TOKENS = {
    "llava": {(32, 32): 16, (100, 100): 16, (64, 32): 16, (37, 120): 16},
    "llava_next": {(32, 32): 36, (100, 100): 88, (64, 32): 52, (37, 120): 76},
}


@pytest.fixture(params=("llava", "llava_next"))
def variant_dir(request: pytest.FixtureRequest) -> tuple[str, pathlib.Path]:
    """(variant, directory) for LLaVA-1.5 and LLaVA-NeXT, from the session fixtures ``tiny_llava`` /
    ``tiny_llava_next``."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _load(path: pathlib.Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _num_feature_rows(image_features) -> int:
    """Number of image embeddings produced by ``get_image_features`` (transformers 5.x returns a model output)."""
    feats = getattr(image_features, "pooler_output", image_features)
    if isinstance(feats, torch.Tensor):
        return feats.numel() // feats.shape[-1]
    return sum(f.numel() // f.shape[-1] for f in feats)


def test_offline_load(variant_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    variant, path = variant_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; patch the live value
    attempts: list = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError(f"network disabled in test: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    processor, model = _load(path)

    assert attempts == []
    assert (path / "model.safetensors").is_file()
    expected = {
        "llava": ("LlavaProcessor", "LlavaForConditionalGeneration"),
        "llava_next": ("LlavaNextProcessor", "LlavaNextForConditionalGeneration"),
    }[variant]
    assert (type(processor).__name__, type(model).__name__) == expected
    assert model.dtype == torch.float32
    tok, cfg = processor.tokenizer, model.config
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    special = [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.convert_ids_to_tokens(special) == ["<unk>", "<s>", "</s>", "<pad>"]
    text = cfg.text_config
    assert [text.bos_token_id, text.eos_token_id, text.pad_token_id] == special[1:]
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 4)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert (cfg.vision_config.patch_size, cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers) == (
        8,
        32,
        2,
    )


def test_image_tokens_match_image_features(variant_dir) -> None:
    variant, path = variant_dir
    processor, model = _load(path)
    sizes = list(IMAGE_TOKENS[variant])
    prompts = [(EXPECTED_PROMPT, [s]) for s in sizes]
    prompts.append(("USER: <image>\n<image>\nSame picture? ASSISTANT:", sizes[1:3]))  # two images, one prompt
    for text, image_sizes in prompts:
        images = [_image(s, seed=i) for i, s in enumerate(image_sizes)]
        inputs = processor(images=images, text=text, return_tensors="pt")
        n_ids = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n_ids == sum(IMAGE_TOKENS[variant][s] for s in image_sizes), (variant, image_sizes)
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=inputs["pixel_values"], **extra)
            logits = model(**inputs).logits
        assert _num_feature_rows(feats) == n_ids
        assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()


def test_chat_template_both_paths(variant_dir) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    _, path = variant_dir
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for tok in (processor.tokenizer, tokenizer):  # lmms-eval's simple llava_hf: string content, "<image>" inline
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{PROMPT}"}], add_generation_prompt=True, tokenize=False
        )
        assert text == EXPECTED_PROMPT
    # lmms-eval's chat llava_hf: list content via the processor (``ChatMessages.model_dump`` adds a "url" key).
    one = [{"role": "user", "content": [{"type": "image", "url": None}, {"type": "text", "text": PROMPT}]}]
    assert processor.apply_chat_template(one, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    two = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]
    text = processor.apply_chat_template(two, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\n<image>\nSame? ASSISTANT: Yes.</s> USER: Sure? ASSISTANT:"
    assert text.count("<image>") == 2
    # The tokenized prompt starts with BOS and keeps "<image>" as a single token.
    ids = processor.tokenizer(EXPECTED_PROMPT)["input_ids"]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids.count(processor.image_token_id) == 1


def test_build_is_deterministic(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file

    dirs = {
        name: build_tiny_model(tmp_path / name, "llava", seed=seed, text_layers=1)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    a, b, c = (load_file(dirs[n] / "model.safetensors") for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(t.dtype == torch.float32 for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (dirs["a"] / "tokenizer.json").read_bytes() == (dirs["c"] / "tokenizer.json").read_bytes()
    assert not any(k.startswith("model.language_model.layers.1.") for k in a)  # text_layers=1


def test_bad_variant() -> None:
    accepted = re.escape(", ".join(FAMILY_VARIANTS))
    for fn in (lambda: build_tiny_model("/nonexistent/never-created", "qwen"), lambda: tiny_model_dir("qwen")):
        with pytest.raises(ValueError, match=rf"'qwen'.*{accepted}$"):
            fn()
    with pytest.raises(ValueError, match="text_layers"):
        build_tiny_model("/nonexistent/never-created", "llava", text_layers=0)


def test_tiny_model_dir_caches(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSTATTN_CACHE", str(tmp_path))
    first = tiny_model_dir("llava")
    assert first.parent == tmp_path and "llava" in first.name and testing._FACTORY_VERSION in first.name
    assert (first / "config.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("cached build was rebuilt")

    monkeypatch.setattr(testing, "build_tiny_model", fail)
    assert tiny_model_dir("llava") == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover temp build dirs


def test_lmms_eval_llava_hf_generates(variant_dir) -> None:
    from lmms_eval.models.simple.llava_hf import LlavaHf

    _, path = variant_dir
    lm = LlavaHf(pretrained=str(path), device="cpu", device_map="cpu", dtype="float32")
    assert lm.model.dtype == torch.float32
    # Same steps as LlavaHf.generate_until (simple path), with a short generation.
    messages = [{"role": "user", "content": f"<image>\n{PROMPT}"}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = _image((48, 40))
    inputs = lm._image_processor(images=[image], text=text, return_tensors="pt").to(lm.device, lm.model.dtype)
    with torch.no_grad():
        out = lm.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=4,
            min_new_tokens=4,
            use_cache=True,
            pad_token_id=lm.eot_token_id,
            eos_token_id=lm.eot_token_id,
        )
    new = out[:, inputs["input_ids"].shape[-1] :]
    assert new.shape == (1, 4)
    assert isinstance(lm.tokenizer.batch_decode(new, skip_special_tokens=True)[0], str)


def test_lmms_eval_chat_generate_until(variant_dir) -> None:
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat

    _, path = variant_dir
    lm = LlavaHfChat(pretrained=str(path), device="cpu", device_map="cpu", dtype="float32")
    image = _image((48, 40))
    lm.task_dict = {"t": {"test": [{"q": PROMPT}]}}

    def doc_to_messages(doc: dict) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": doc["q"]}]}]

    args = ("", doc_to_messages, {"max_new_tokens": 2}, 0, "t", "test")
    inst = Instance(
        request_type="generate_until", arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1}
    )
    (result,) = lm.generate_until([inst])
    # generate_until swallows exceptions and then reports no token counts.
    assert result.token_counts is not None and result.token_counts.output_tokens >= 1


def test_build_tiny_command_builds_any_family(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from lmms_lostattn.cli import main

    main(["build-tiny", str(tmp_path / "qwen"), "--variant", "qwen2_5_vl"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "qwen")
    assert json.loads((tmp_path / "qwen" / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_build_tiny_names_the_variants_for_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    from lmms_lostattn.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["build-tiny", "/nonexistent/never-created", "--variant", "nope"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "unknown --variant 'nope'; one of llava, llava_next" in err


@pytest.mark.parametrize("command", ["build-tiny", "tasks-path"])
def test_an_output_path_that_cannot_be_written_exits_2_naming_it(
    command: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the folder goes: a message and status 2, as report, demo and the others give, not a traceback."""
    from lmms_lostattn.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LOSTATTN_CACHE", str(blocker))
    argv = ["build-tiny", str(blocker / "llama"), "--variant", "llama"] if command == "build-tiny" else [command]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"lostattn {command}: ") and str(blocker) in err, err
