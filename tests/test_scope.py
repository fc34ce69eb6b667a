"""The intervention on a live tiny LLaVA: parity with HF eager attention, scoping, determinism, restoration."""

from __future__ import annotations

import contextlib
import pathlib

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from lmms_lostattn.config.spec import InterventionSpec
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention import rng
from lmms_lostattn.intervention.kernel import EDIT_ATTRIBUTE
from lmms_lostattn.intervention.scope import InterventionError, intervene

MODES = ["gaussian", "uniform", "identity", "sink", "shuffle", "knockout", "noise_delta", "noise_qkv"]
QUESTIONS = ["Is there a red circle?", "What colour is the big square in the picture on the left?"]


@pytest.fixture(scope="module")
def processor(tiny_llava: pathlib.Path):
    proc = AutoProcessor.from_pretrained(tiny_llava)
    proc.tokenizer.padding_side = "left"
    return proc


@pytest.fixture(scope="module")
def model(tiny_llava: pathlib.Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()


def prompt(processor, question: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40, 32), (40 + 90 * i, 200 - 60 * i, 90)) for i in range(n)]


@pytest.fixture(scope="module")
def batch(processor) -> dict[str, torch.Tensor]:
    """Two samples of different prompt lengths, left-padded into one batch."""
    return processor(
        images=images(2), text=[prompt(processor, q) for q in QUESTIONS], padding=True, return_tensors="pt"
    )


@pytest.fixture(scope="module")
def singles(processor) -> list[dict[str, torch.Tensor]]:
    return [
        processor(images=[img], text=[prompt(processor, q)], return_tensors="pt")
        for img, q in zip(images(2), QUESTIONS, strict=True)
    ]


def resolve(model, **args: object):
    text = model.config.get_text_config()
    return InterventionSpec.from_model_args(args).resolve(text.num_hidden_layers, text.num_attention_heads)


def logits(model, inputs, **args: object) -> torch.Tensor:
    with torch.no_grad():
        if not args:
            return model(**inputs).logits
        with intervene(model, resolve(model, **args), adapter_for(model.config)):
            return model(**inputs).logits


def generate(model, inputs, use_cache: bool = True, **args: object) -> torch.Tensor:
    return generate_with_logits(model, inputs, use_cache, **args)[0]


def generate_with_logits(model, inputs, use_cache: bool = True, **args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated tokens and each step's logits ``(B, steps, V)``; unedited without ``args``."""
    kwargs = {"max_new_tokens": 4, "do_sample": False, "use_cache": use_cache, "pad_token_id": 3,
              "output_logits": True, "return_dict_in_generate": True}
    scope = intervene(model, resolve(model, **args), adapter_for(model.config)) if args else contextlib.nullcontext()
    with torch.no_grad(), scope:
        run = model.generate(**inputs, **kwargs)
    return run.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(run.logits, dim=1)


EDITED = 1e-4  # an edit moves some logit by more than this; float noise of an unedited path stays far below it


@pytest.fixture(scope="module")
def eager(tiny_llava: pathlib.Path):
    return AutoModelForImageTextToText.from_pretrained(
        tiny_llava, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_nothing_edited_matches_hf_eager_attention(eager, model, batch) -> None:
    """Every row of every layer through our materialised path, with lambda=0, equals HF's eager attention."""
    with torch.no_grad():
        reference = eager(**batch).logits
    ours = logits(model, batch, attn="uniform", attn_lambda=0, attn_rows="all", attn_keys="all")
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=0)


def _layer0_weights(eager, batch, **args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """HF eager attention weights of layer 0 ``(B, H, Q, K)``, and the edited ones with only layer 0 edited."""
    with torch.no_grad():
        base = eager(**batch, output_attentions=True).attentions[0]
        with intervene(eager, resolve(eager, attn_layers="0", **args), adapter_for(eager.config)):
            return base, eager(**batch, output_attentions=True).attentions[0]


@pytest.mark.parametrize("heads", ["all", "0,2"])
@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_uniform_probs_all_rows_is_the_blend_of_hf_eager_weights(eager, batch, heads: str, lam: float) -> None:
    """SPEC §2's probs blend, w_E <- (1 - lambda) w_E + lambda m / |E|, applied to HF's own eager weights: E = the
    allowed image keys of every real row, in the edited heads."""
    base, ours = _layer0_weights(
        eager, batch, attn="uniform", attn_space="probs", attn_rows="all", attn_heads=heads, attn_lambda=lam
    )
    real = batch["attention_mask"].bool()
    position = torch.arange(real.shape[1])
    allowed = (position[None, :] <= position[:, None]) & real[:, None, :] & real[:, :, None]  # (B, Q, K)
    image = batch["input_ids"] == eager.config.image_token_id
    edit = (allowed & image[:, None, :])[:, None]
    if heads != "all":
        edit = edit & (torch.arange(base.shape[1]) % 2 == 0).view(1, -1, 1, 1)
    mass = (base * edit).sum(-1, keepdim=True)
    expected = torch.where(edit, (1 - lam) * base + lam * mass / edit.sum(-1, keepdim=True).clamp_min(1), base)
    rows = real[:, None, :].expand(base.shape[:3])
    torch.testing.assert_close(ours[rows], expected[rows], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[rows], base[rows], atol=1e-3)


def test_per_head_draws_give_each_head_its_own_pattern(eager, batch) -> None:
    """``attn_draw=per_head`` (gaussian's default): one p per sample, layer and head, also when every head is
    edited; with lambda = 1 in probs space an edited row is m p on its edited keys."""
    base, ours = _layer0_weights(eager, batch, attn="gaussian", attn_space="probs", attn_rows="all")
    image = batch["input_ids"][1] == eager.config.image_token_id

    def pattern_of(row: int) -> torch.Tensor:  # (H, image keys) of sample 1 (no padding)
        return ours[1, :, row][:, image] / base[1, :, row][:, image].sum(-1, keepdim=True)

    torch.testing.assert_close(pattern_of(-1).sum(-1), torch.ones(base.shape[1]))
    torch.testing.assert_close(pattern_of(-1), pattern_of(-2))  # the keys' draws, whatever the row
    assert not torch.allclose(pattern_of(-1)[0], pattern_of(-1)[1], atol=1e-3)


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read device data back to the host (a synchronisation on an accelerator)."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.READS
        return func(*args, **(kwargs or {}))


def test_rows_last_decoding_steps_read_nothing_back(model, batch) -> None:
    """A decoding step of the paper preset (rows last) reads back exactly what the model's own step does."""

    def reads(new_tokens: int, **args: object) -> int:
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 3}
        scope = contextlib.nullcontext()
        if args:
            scope = intervene(model, resolve(model, **args), adapter_for(model.config))
        with torch.no_grad(), scope, HostReads() as counter:
            model.generate(**batch, **kwargs)
        return counter.count

    paper = {"attn": "gaussian", "attn_preset": "paper", "attn_layers": "1:"}
    assert reads(5, **paper) - reads(1, **paper) == reads(5) - reads(1)


def test_attn_none_and_unedited_layers_are_bitwise_the_original(model, batch) -> None:
    with torch.no_grad():
        base = model(**batch, output_hidden_states=True).hidden_states
        with intervene(model, resolve(model, attn="uniform", attn_layers="2"), adapter_for(model.config)):
            edited = model(**batch, output_hidden_states=True).hidden_states
    for layer in range(3):  # hidden_states[i] is the input of layer i: layers 0 and 1 ran the original kernel
        assert torch.equal(base[layer], edited[layer])
    assert not torch.allclose(base[3], edited[3])
    assert torch.equal(logits(model, batch), logits(model, batch, attn="none"))


def _head_outputs(model, inputs, layer: int, **args: object) -> torch.Tensor:
    """Per-head attention outputs ``(B, S, H, D)`` of one layer (the input of its o_proj)."""
    seen = {}
    attention = adapter_for(model.config).decoder_layers(model)[layer].self_attn
    handle = attention.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        logits(model, inputs, **args)
    finally:
        handle.remove()
    heads = model.config.get_text_config().num_attention_heads
    return seen["x"].unflatten(-1, (heads, -1))


@pytest.mark.parametrize("mode", ["gaussian", "uniform", "sink", "shuffle", "knockout"])
def test_only_selected_layer_heads_and_rows_change(model, batch, mode: str) -> None:
    base = _head_outputs(model, batch, 1)
    edited = _head_outputs(model, batch, 1, attn=mode, attn_layers="1", attn_heads="0,2")
    last = batch["input_ids"].shape[1] - 1
    assert torch.equal(edited[:, :last], base[:, :last])  # rows before the last prompt token: untouched
    assert torch.equal(edited[:, :, [1, 3]], base[:, :, [1, 3]])  # heads not selected: untouched
    assert not torch.allclose(edited[:, last, [0, 2]], base[:, last, [0, 2]])


def test_rows_image_edits_image_rows_only(model, batch) -> None:
    base = _head_outputs(model, batch, 0)
    edited = _head_outputs(model, batch, 0, attn="uniform", attn_layers="0", attn_rows="image")
    image = batch["input_ids"] == model.config.image_token_id
    assert torch.equal(edited[~image], base[~image])
    assert not torch.allclose(edited[image], base[image])


CASES = [{"attn": mode} for mode in MODES] + [
    {"attn": "gaussian", "attn_heads": "p0.2-0.7", "attn_dist": "normal", "attn_sigma": 3},
    {"attn": "uniform", "attn_rows": "text", "attn_keys": "text", "attn_heads": "1,3"},
    # the released SAP rule's options: p rescaled to the scores, one p per prompt, OneVision's head score
    {
        "attn": "gaussian",
        "attn_scale": "scores",
        "attn_draw": "shared",
        "attn_heads": "p0.3-0.6",
        "attn_head_score": "sides",
    },
    {"attn": "gaussian", "attn_scale": "scores", "attn_rows": "all", "attn_lambda": 0.5},
    {"attn": "uniform", "attn_space": "logits", "attn_scale": "scores", "attn_keys": "all"},
]


@pytest.mark.parametrize("args", CASES, ids=lambda args: "-".join(map(str, args.values())))
def test_cached_decoding_equals_recomputation(model, batch, args: dict) -> None:
    """Every step's logits, not only the tokens (an edit may not change a greedy token): cached decoding edits what
    recomputing the whole sequence edits, and the edit moves the logits."""
    tokens, with_cache = generate_with_logits(model, batch, **args)
    recomputed_tokens, recomputed = generate_with_logits(model, batch, use_cache=False, **args)
    assert torch.equal(tokens, recomputed_tokens)
    torch.testing.assert_close(with_cache, recomputed, atol=1e-5, rtol=0)
    _, unedited = generate_with_logits(model, batch)
    assert (with_cache[:, 1:] - unedited[:, 1:]).abs().max() > EDITED  # the decoding steps' rows are edited too


class ForceFirstToken:
    """A logits processor that makes ``token`` the first generated token."""

    def __init__(self, prompt_length: int, token: int) -> None:
        self.prompt_length, self.token = prompt_length, token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, -torch.inf)
            scores[:, self.token] = 0.0
        return scores


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
def test_a_generated_image_token_is_not_an_image_key(model, processor, batch, use_cache: bool) -> None:
    """A generated token whose id is the image token's is embedded as a token: attn_keys=image must not edit it.
    HF's LLaVA refuses to recompute an image prompt grown by an image token, so that case runs on a text prompt."""
    inputs = batch if use_cache else processor(text=[prompt(processor, QUESTIONS[0], image=False)], return_tensors="pt")
    image_token, prompt_length = model.config.image_token_id, inputs["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "use_cache": use_cache, "pad_token_id": 3,
              "logits_processor": [ForceFirstToken(prompt_length, image_token)]}
    args = {"attn": "gaussian"} if use_cache else {"attn": "gaussian", "attn_keys": "all"}
    with torch.no_grad(), intervene(model, resolve(model, **args), adapter_for(model.config)) as scope:
        generated = model.generate(**inputs, **kwargs)[:, prompt_length:]
        tracked = scope.state.is_visual
    assert (generated[:, 0] == image_token).all()
    assert tracked.shape[1] == prompt_length + 2  # the last generated token is never fed back
    assert torch.equal(tracked[:, :prompt_length], inputs["input_ids"] == image_token)
    assert not tracked[:, prompt_length:].any()


def test_a_cached_forward_of_several_positions_is_refused(model, singles) -> None:
    """Assisted decoding (and a prompt fed in chunks) continues a cache with several positions at once: it cannot be
    told apart from more prompt, so it is refused instead of guessed."""
    inputs = singles[0]
    with torch.no_grad(), intervene(model, resolve(model, attn="gaussian"), adapter_for(model.config)):
        cache = model(**inputs, use_cache=True).past_key_values
        more = torch.full((1, 2), model.config.image_token_id)
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 2, dtype=torch.long)
        with pytest.raises(InterventionError, match=r"cached forward of 2 new positions.*assisted decoding"):
            model(input_ids=more, attention_mask=mask, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("extension", [1, 4], ids=["one-token-longer", "four-tokens-longer"])
def test_a_forward_extending_the_last_prompt_is_a_new_prompt(model, singles, extension: int) -> None:
    """Scoring a longer option right after a shorter one in the same scope (the direct API, no ``set_samples``)
    gives the longer option's logits scored alone: only ``generate(use_cache=False)`` recomputes a prompt."""
    adapter, inter = adapter_for(model.config), resolve(model, attn="gaussian")
    shorter = singles[0]
    longer = {**shorter, "input_ids": torch.cat([shorter["input_ids"], torch.full((1, extension), 7)], dim=1),
              "attention_mask": torch.ones(1, shorter["input_ids"].shape[1] + extension, dtype=torch.long)}
    with torch.no_grad():
        with intervene(model, inter, adapter):
            alone = model(**longer).logits
        with intervene(model, inter, adapter):
            model(**shorter)
            after_shorter = model(**longer).logits
    assert torch.equal(after_shorter, alone)
    assert (alone - logits(model, longer)).abs().max() > EDITED


@pytest.mark.parametrize("args", CASES, ids=lambda args: "-".join(map(str, args.values())))
def test_batch_of_two_equals_two_batches_of_one(model, batch, singles, args: dict) -> None:
    together = logits(model, batch, **args)[:, -1]
    alone = torch.cat([logits(model, single, **args)[:, -1] for single in singles])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert (together - logits(model, batch)[:, -1]).abs().max() > EDITED
    tokens = generate(model, batch, **args)
    for row, single in enumerate(singles):
        assert torch.equal(tokens[row], generate(model, single, **args)[0])


@pytest.mark.parametrize("mode", ["gaussian", "shuffle", "noise_delta", "noise_qkv"])
def test_same_seed_same_outputs_other_seed_other_outputs(model, batch, mode: str) -> None:
    first = logits(model, batch, attn=mode, attn_seed=3)
    assert torch.equal(first, logits(model, batch, attn=mode, attn_seed=3))
    assert not torch.allclose(first, logits(model, batch, attn=mode, attn_seed=4))


def test_sample_ids_key_the_draws(model, singles) -> None:
    adapter, inter = adapter_for(model.config), resolve(model, attn="gaussian")
    outputs = []
    with torch.no_grad(), intervene(model, inter, adapter) as scope:
        for name in ["pope/test/1", "pope/test/1", "pope/test/2"]:
            scope.set_samples([name])
            outputs.append(model(**singles[0]).logits[:, -1])
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize(("dist", "keys"), [("dirichlet", "image"), ("normal", "all")])
def test_decoding_steps_use_the_prompts_draws(model, batch, dist: str, keys: str) -> None:
    """A decoding step's edited row gets the p a fresh prefill of the same sequence draws (SPEC §2: p is drawn once
    per sample and reused while decoding). Only the last layer is edited, so the earlier rows the decoding run
    edited cannot reach the last row, and a new scope over the generated sequence is an independent reference."""
    adapter = adapter_for(model.config)
    inter = resolve(model, attn="gaussian", attn_dist=dist, attn_keys=keys, attn_layers="-1", attn_heads="p0.3-0.9")
    names = ["pope/test/1", "pope/test/2"]
    with torch.no_grad(), intervene(model, inter, adapter) as scope:
        scope.set_samples(names)
        run = model.generate(
            **batch, max_new_tokens=4, do_sample=False, pad_token_id=3, output_logits=True, return_dict_in_generate=True
        )
    sequence = run.sequences[:, :-1]  # the last step's input: prompt and the first three generated tokens
    grown = torch.ones_like(batch["attention_mask"][:, :3])
    inputs = {**batch, "input_ids": sequence, "attention_mask": torch.cat([batch["attention_mask"], grown], dim=1)}
    with torch.no_grad(), intervene(model, inter, adapter) as scope:
        scope.set_samples(names)
        fresh = model(**inputs).logits[:, -1]
    torch.testing.assert_close(run.logits[-1], fresh, atol=1e-4, rtol=0)
    assert not torch.allclose(fresh, logits(model, inputs)[:, -1], atol=1e-3)  # the edit does change the logits


def test_a_scoring_pass_edits_the_rows_generation_edits(model, batch) -> None:
    """loglikelihood scores context + continuation in one forward with ``labels``; ``attn_rows=last`` must edit the
    continuation's rows as if it had been generated, so the scored logits equal those of generating it (KV cache)."""
    adapter = adapter_for(model.config)
    inter = resolve(model, attn="gaussian", attn_heads="p0.3-0.9")
    names = ["mmbench/dev/3", "mmbench/dev/4"]
    with torch.no_grad(), intervene(model, inter, adapter) as scope:
        scope.set_samples(names)
        run = model.generate(
            **batch, max_new_tokens=4, do_sample=False, pad_token_id=3, output_logits=True, return_dict_in_generate=True
        )
    prompt_len = batch["input_ids"].shape[1]
    labels = run.sequences.clone()
    labels[:, :prompt_len] = -100
    grown = torch.ones_like(batch["attention_mask"][:, :4])
    inputs = {**batch, "input_ids": run.sequences, "attention_mask": torch.cat([batch["attention_mask"], grown], dim=1)}
    generated = torch.stack(run.logits, dim=1)  # rows prompt_len-1 .. prompt_len+2 predict the four tokens
    scored = {}
    for name, extra in (("labels", {"labels": labels}), ("no labels", {})):
        with torch.no_grad(), intervene(model, inter, adapter) as scope:
            scope.set_samples(names)
            scored[name] = model(**inputs, **extra).logits[:, prompt_len - 1 : prompt_len + 3]
    torch.testing.assert_close(scored["labels"], generated, atol=1e-4, rtol=0)
    assert not torch.allclose(scored["no labels"][:, 1:], generated[:, 1:], atol=1e-3)  # only the last row edited


def test_noise_qkv_restores_weights_bit_for_bit(model, batch) -> None:
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with intervene(model, resolve(model, attn="noise_qkv", attn_layers="0,2"), adapter_for(model.config)):
        changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {f"model.language_model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 2) for p in "qkv"}
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_noise_delta_keeps_the_per_token_rms(model, batch) -> None:
    seen: list[torch.Tensor] = []
    attention = adapter_for(model.config).decoder_layers(model)[1].self_attn

    def keep(module, args, output):
        seen.append(output[0])

    with intervene(model, resolve(model, attn="noise_delta", attn_layers="1"), adapter_for(model.config)):
        handle = attention.register_forward_hook(keep)  # registered after ours: sees the replaced update
        try:
            logits(model, batch)
            base = _original_update(model, batch, attention)
        finally:
            handle.remove()
    real = batch["attention_mask"].bool()
    noise = seen[0]
    torch.testing.assert_close(noise.pow(2).mean(-1).sqrt()[real], base.pow(2).mean(-1).sqrt()[real])
    assert (noise - base).abs()[real].max() > 1e-3


def test_noise_delta_draws_noise_for_the_edited_rows_only(model, batch, monkeypatch) -> None:
    """attn_rows=last on a long prompt: the noise covers the last row, not every position of the prompt."""
    drawn: list[torch.Size] = []
    normal = rng.normal
    monkeypatch.setattr(rng, "normal", lambda *args: drawn.append((noise := normal(*args)).shape) or noise)
    logits(model, batch, attn="noise_delta", attn_rows="last", attn_layers="1")
    assert drawn == [torch.Size([batch["input_ids"].shape[0], 1, model.config.get_text_config().hidden_size])]


@pytest.mark.parametrize("variant", ["llama", "olmo2", "gemma3_text"])
def test_noise_delta_keeps_the_rms_of_the_update_added_to_the_residual_stream(tiny_model, variant: str) -> None:
    """Sandwich-norm layers (OLMo-2, Gemma) add their post-attention norm's output: the noise replaces that, so the
    norm's weights (random here, as trained ones are not all equal) cannot rescale it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model(variant), dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    layer = adapter.decoder_layers(model)[1]
    with torch.no_grad():
        for name, weight in layer.named_parameters():
            if "norm" in name:
                weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) * 2)
    added = adapter.update_modules(layer)[0]
    inputs = {"input_ids": torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    base = _original_update(model, inputs, added)
    seen: list[torch.Tensor] = []
    with intervene(model, resolve(model, attn="noise_delta", attn_layers="1", attn_rows="all"), adapter):
        handle = added.register_forward_hook(lambda m, a, out: seen.append(_update(out)))
        try:
            logits(model, inputs)
        finally:
            handle.remove()
    rms = [update.pow(2).mean(-1).sqrt() for update in (seen[0], base)]
    torch.testing.assert_close(rms[0], rms[1])
    assert (seen[0] - base).abs().max() > 1e-3


@pytest.mark.parametrize("args", [{"attn": "uniform"}, {"attn": "noise_delta", "attn_rows": "image"}],
                         ids=["image-keys", "noise-image-rows"])
def test_a_prompt_without_image_tokens_is_refused_where_the_edit_needs_them(model, processor, args) -> None:
    """Nothing to edit in a text-only prompt: refused, never a run that silently changed nothing."""
    text_only = processor(text=[prompt(processor, QUESTIONS[0], image=False)], return_tensors="pt")
    refused = pytest.raises(InterventionError, match=r"image tokens, but sample\(s\) \[0\] of this batch have none")
    with torch.no_grad(), intervene(model, resolve(model, **args), adapter_for(model.config)), refused:
        model(**text_only)
    mixed = processor(images=images(1), text=[prompt(processor, QUESTIONS[0]), prompt(processor, QUESTIONS[1], False)],
                      padding=True, return_tensors="pt")
    named = pytest.raises(InterventionError, match=r"image tokens, but sample\(s\) pope/test/7 have none")
    with torch.no_grad(), intervene(model, resolve(model, **args), adapter_for(model.config)) as scope, named:
        scope.set_samples(["pope/test/3", "pope/test/7"])  # a host's rows are named by their documents
        model(**mixed)


def test_a_prepared_attention_mask_is_refused_by_name(tiny_model) -> None:
    """generate() with a static cache hands the model a 4-D mask instead of the padding mask: refused, naming it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    inputs = {"input_ids": torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(2))}
    inputs["attention_mask"] = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    inter = resolve(model, attn="uniform", attn_keys="all")
    with torch.no_grad(), intervene(model, inter, adapter_for(model.config)) as scope:
        scope.set_samples(["a", "b"])
        with pytest.raises(InterventionError, match=r"prepared attention mask \(a 4-D tensor\).*'static'"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           cache_implementation="static")


def _update(output) -> torch.Tensor:
    """What a module hooked as the attention update returns: an attention module's first output, a norm's tensor."""
    return output[0] if isinstance(output, tuple) else output


def _original_update(model, batch, attention) -> torch.Tensor:
    seen = []
    handle = attention.register_forward_hook(lambda m, a, out: seen.append(_update(out)), prepend=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("mode", MODES)
def test_nothing_stays_attached(model, batch, mode: str) -> None:
    def hooks() -> list[tuple[int, ...]]:  # transformers keeps its own output-capturing hooks; ours must go
        return [(*m._forward_pre_hooks, *m._forward_hooks) for m in model.modules()]

    logits(model, batch)
    before = hooks()
    logits(model, batch, attn=mode)
    assert hooks() == before
    assert not any(hasattr(module, EDIT_ATTRIBUTE) for module in model.modules())
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_image_keys_on_a_prompt_without_image_is_an_error(model, processor) -> None:
    """Image keys in a text-only prompt are refused; text keys there are edited (the logits move)."""
    inputs = processor.tokenizer([prompt(processor, "Hello there", image=False)], return_tensors="pt")
    with pytest.raises(InterventionError, match=r"attn_keys=image.*no image|none \(image token ids"):
        logits(model, inputs, attn="gaussian")
    assert not torch.allclose(logits(model, inputs, attn="uniform", attn_keys="text"), logits(model, inputs), atol=1e-3)


def test_right_padding_is_refused(model, processor) -> None:
    processor.tokenizer.padding_side = "right"
    try:
        inputs = processor(
            images=images(2), text=[prompt(processor, q) for q in QUESTIONS], padding=True, return_tensors="pt"
        )
    finally:
        processor.tokenizer.padding_side = "left"
    with pytest.raises(InterventionError, match=r"left padding.*padding_side='left'\) or batch size 1$"):
        logits(model, inputs, attn="uniform")
    one = {**{key: value[:1] for key, value in inputs.items()}, "pixel_values": inputs["pixel_values"][:1]}
    one["attention_mask"] = one["attention_mask"].clone()
    one["attention_mask"][0, -1] = 0  # one prompt padded on the right (lmms-eval's gemma3 pads to a multiple of 8)
    with pytest.raises(InterventionError, match=r"padding_side='left'\)$"):  # batch size 1 would not help
        logits(model, one, attn="uniform")


def test_errors_inside_generate_are_kept_for_the_caller(model, processor) -> None:
    inputs = processor.tokenizer([prompt(processor, "Hello", image=False)], return_tensors="pt")
    with intervene(model, resolve(model, attn="gaussian"), adapter_for(model.config)) as scope:
        with contextlib.suppress(InterventionError):  # what lmms-eval's llava_hf does: log and carry on
            model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(InterventionError):
            scope.raise_pending()
        scope.raise_pending()  # reported once
