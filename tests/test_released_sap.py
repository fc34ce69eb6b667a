"""The paper preset against an independent implementation of the released SAP rule (eager attention, float64).

The reference below is written from the description of the authors' released decoder files, not from this package:
for one sample, s = q·kᵀ·scaling (every head, row and key of the forward, before the mask); the edited row is the
forward's last row; head score = −mean of that row's scores over the non-image keys (``pooled``) or −(mean over
the keys before the image + mean over the keys after it)/2 (``sides``); heads between the torch.quantile values
of the band are edited; p′ = p·|mean(s)|/(2·mean(p)) (``scores``) or p; s_image ← (1−λ)s + λp′ on the edited
heads' last row; then the causal mask, softmax and the values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmms_lostattn.config.spec import InterventionSpec
from lmms_lostattn.families import adapter_for
from lmms_lostattn.intervention.kernel import sdpa_attention_forward
from lmms_lostattn.intervention.patterns import Coordinates
from lmms_lostattn.intervention.prompt import NO_END, InterventionError, PromptState
from lmms_lostattn.intervention.scope import Scope
from lmms_lostattn.testing import make_tiny_model

PROMPT, IMAGE = 12, range(3, 9)  # prompt length; its image tokens
GENERATED = 3  # tokens generated before the cached decoding step tested
HEADS, DIM, BAND, LAYER = 8, 8, (0.3, 0.6), 2


def reference(q, k, v, p, scale: bool, sides: bool, lam: float) -> torch.Tensor:
    """One sample: q ``(H, Q, D)``, k/v ``(Hkv, K, D)``, p ``(H, K)`` zero outside the image keys; the forward's
    rows end at key position K - 1. Returns the attention output ``(Q, H, D)``."""
    q, k, v, p = (t.double() for t in (q, k, v, p))
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    s = q @ k.transpose(-1, -2) * DIM**-0.5
    image = torch.zeros(s.shape[-1], dtype=torch.bool)
    image[IMAGE.start : IMAGE.stop] = True
    row = s[:, -1, :]
    pooled = -row[:, ~image].mean(-1)
    score = -(row[:, : IMAGE.start].mean(-1) + row[:, IMAGE.stop :].mean(-1)) / 2 if sides else pooled
    low, high = torch.quantile(score, BAND[0]), torch.quantile(score, BAND[1])
    heads = ((score >= low) & (score <= high)).nonzero().flatten()
    target = p[:, image]
    if scale:
        target = target * s.mean().abs() / (2 * target.mean(-1, keepdim=True).abs())
    edited, keys = s.clone(), image.nonzero().flatten()
    edited[heads[:, None], -1, keys[None, :]] = (1 - lam) * s[heads[:, None], -1, keys[None, :]] + lam * target[heads]
    num_q, num_k = s.shape[-2:]
    future = torch.arange(num_k)[None, :] > torch.arange(num_k - num_q, num_k)[:, None]
    weights = edited.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llava", text_layers=4)[0]


def _scope(model, scale: str, draw: str, head_score: str, lam: float) -> Scope:
    args = {
        "attn": "gaussian",
        "attn_layers": "all",
        "attn_heads": f"p{BAND[0]}-{BAND[1]}",
        "attn_lambda": lam,
        "attn_scale": scale,
        "attn_draw": draw,
        "attn_head_score": head_score,
    }
    intervention = InterventionSpec.from_model_args(args).resolve(4, HEADS)
    return Scope(model, intervention, adapter_for(model.config))


def _prompt_state(batch: int, total: int) -> PromptState:
    ids = torch.full((batch, PROMPT), 7)
    visual = torch.zeros(batch, total, dtype=torch.bool)
    visual[:, IMAGE.start : IMAGE.stop] = True
    keys = torch.tensor([1000 + 17 * b for b in range(batch)])
    return PromptState(ids, visual, torch.zeros(batch, dtype=torch.long), torch.full((batch,), NO_END), keys)


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("phase", ["prefill", "decoding"])
@pytest.mark.parametrize("head_score", ["pooled", "sides"])
@pytest.mark.parametrize("draw", ["per_head", "shared"])
@pytest.mark.parametrize("scale", ["none", "scores"])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_attention_function_equals_the_released_rule(model, scale, draw, head_score, phase, kv_heads, lam) -> None:
    scope = _scope(model, scale, draw, head_score, lam)
    total = PROMPT if phase == "prefill" else PROMPT + GENERATED
    num_q = PROMPT if phase == "prefill" else 1
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, HEADS, num_q, DIM, generator=generator)
    k = torch.randn(2, kv_heads, total, DIM, generator=generator)
    v = torch.randn(2, kv_heads, total, DIM, generator=generator)
    scope.prompts.state = _prompt_state(2, total)
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, HEADS // kv_heads
    out, _ = scope.attend(sdpa_attention_forward, module, LAYER, q, k, v, None, 0.0, DIM**-0.5, {})
    state = scope.state
    coords = Coordinates(state.sample_key, state.first_real, LAYER, range(total), torch.tensor([total - 1]))
    draws = Coordinates(**{**coords.__dict__, "shared": draw == "shared"}).key_draws("dirichlet", HEADS)
    image = torch.zeros(total, dtype=torch.bool)
    image[IMAGE.start : IMAGE.stop] = True
    p = torch.where(image, draws.expand(2, HEADS, 1, total)[:, :, 0], 0.0)
    p = p / p.sum(-1, keepdim=True)
    for sample in range(2):
        expected = reference(q[sample], k[sample], v[sample], p[sample], scale == "scores", head_score == "sides", lam)
        torch.testing.assert_close(out[sample].double(), expected, atol=1e-6, rtol=1e-6)


def test_shared_draws_are_one_p_for_every_layer_and_head() -> None:
    state = _prompt_state(2, PROMPT)
    per_layer = [
        Coordinates(state.sample_key, state.first_real, layer, range(PROMPT), torch.arange(PROMPT), shared=True)
        for layer in (1, 5)
    ]
    first, second = (coords.key_draws("dirichlet", HEADS) for coords in per_layer)
    assert first.shape == (2, 1, 1, PROMPT) and torch.equal(first, second)
    per_head = Coordinates(state.sample_key, state.first_real, 1, range(PROMPT), torch.arange(PROMPT))
    assert not torch.equal(per_head.key_draws("dirichlet", HEADS)[:, 0], per_head.key_draws("dirichlet", HEADS)[:, 1])


DEVICE_CASES = [
    {
        "attn": "gaussian",
        "attn_heads": "p0.3-0.6",
        "attn_scale": "scores",
        "attn_draw": "shared",
        "attn_head_score": "sides",
    },
    {"attn": "gaussian", "attn_dist": "normal", "attn_rows": "all"},
    {"attn": "uniform", "attn_keys": "all", "attn_heads": "1,3"},
    {"attn": "shuffle", "attn_space": "logits"},
    {"attn": "knockout", "attn_rows": "text"},
]


@pytest.mark.parametrize("phase", ["prefill", "decoding"])
@pytest.mark.parametrize("args", DEVICE_CASES, ids=lambda args: "-".join(map(str, args.values())))
def test_a_layer_on_another_device_gets_every_tensor_on_its_device(model, args: dict, phase: str) -> None:
    """With ``device_map=auto`` the decoder layers sit on several devices while the prompt state stays on the
    input's. Here the state is on the CPU and the layer's q/k/v on the meta device, where an operation with a CPU
    tensor fails: every tensor the scope hands the layer must have been moved there."""
    intervention = InterventionSpec.from_model_args({"attn_layers": "all", **args}).resolve(4, HEADS)
    scope = Scope(model, intervention, adapter_for(model.config))
    total = PROMPT if phase == "prefill" else PROMPT + GENERATED
    num_q = PROMPT if phase == "prefill" else 1
    scope.prompts.state = _prompt_state(2, total)
    q = torch.empty(2, HEADS, num_q, DIM, device="meta")
    k, v = (torch.empty(2, 2, total, DIM, device="meta") for _ in range(2))
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, HEADS // 2
    for layer in (1, 2):  # a second layer on the same device reuses the step's selection and draws
        out, _ = scope.attend(sdpa_attention_forward, module, layer, q, k, v, None, 0.0, DIM**-0.5, {})
        assert out.device.type == "meta" and out.shape == (2, num_q, HEADS, DIM)


def test_noise_delta_on_another_device(model) -> None:
    intervention = InterventionSpec.from_model_args({"attn": "noise_delta", "attn_layers": "all"}).resolve(4, HEADS)
    scope = Scope(model, intervention, adapter_for(model.config))
    scope.prompts.state = _prompt_state(2, PROMPT)
    delta = torch.empty(2, PROMPT, 16, device="meta")
    replaced = scope.noise_delta_hook(1)(nn.Module(), (), (delta, None))
    assert replaced[0].device.type == "meta" and replaced[0].shape == delta.shape


def test_an_attention_call_with_learned_sinks_is_refused(model) -> None:
    """gpt-oss passes its attention sinks as ``s_aux``: weights rebuilt from q.k alone would drop them."""
    intervention = InterventionSpec.from_model_args({"attn": "uniform", "attn_layers": "all"}).resolve(4, HEADS)
    scope = Scope(model, intervention, adapter_for(model.config))
    scope.prompts.state = _prompt_state(2, PROMPT)
    q = torch.randn(2, HEADS, PROMPT, DIM)
    k, v = (torch.randn(2, 2, PROMPT, DIM) for _ in range(2))
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, HEADS // 2
    sinks = {"s_aux": torch.zeros(HEADS)}
    with pytest.raises(InterventionError, match=r"Module passes s_aux to its attention function"):
        scope.attend(sdpa_attention_forward, module, 1, q, k, v, None, 0.0, DIM**-0.5, sinks)
    out, _ = scope.attend(sdpa_attention_forward, module, 1, q, k, v, None, 0.0, DIM**-0.5, {})
    assert out.shape == (2, PROMPT, HEADS, DIM)
