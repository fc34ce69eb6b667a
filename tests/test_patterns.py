"""Each mode does what SPEC §2 says, checked on the attention weights themselves."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmms_lostattn.config.spec import Intervention
from lmms_lostattn.intervention import patterns, rng
from lmms_lostattn.intervention.patterns import (
    Coordinates,
    band_heads,
    edited_weights,
    head_scores,
    masked_softmax,
    shuffle_within,
)

B, H, Q, K = 2, 3, 4, 6


@pytest.fixture
def block() -> dict[str, torch.Tensor]:
    """Random logits, a causal mask (queries at positions 2..5), and edits on the keys 1..3 ("image")."""
    torch.manual_seed(0)
    scores = torch.randn(B, H, Q, K) * 2
    query_abs, key_abs = torch.arange(2, 6), torch.arange(K)
    allowed = (key_abs[None, :] <= query_abs[:, None])[None, None]
    image = torch.zeros(K, dtype=torch.bool)
    image[1:4] = True
    edit = (allowed & image).expand(B, H, Q, K)
    coords = Coordinates(torch.tensor([11, 12]), torch.zeros(B, dtype=torch.long), 0, range(K), query_abs)
    return {
        "scores": scores,
        "allowed": allowed,
        "edit": edit,
        "coords": coords,
        "key_abs": key_abs,
        "query_abs": query_abs,
    }


def run(block: dict, mode: str, space: str = "probs", lam: float = 1.0, **extra: object) -> torch.Tensor:
    inter = Intervention(mode=mode, space=space, lam=lam, **extra)
    return edited_weights(block["scores"], block["allowed"], block["edit"], inter, block["coords"])


def learned(block: dict) -> torch.Tensor:
    return masked_softmax(block["scores"], block["allowed"])


@pytest.mark.parametrize("mode", ["gaussian", "uniform", "sink", "shuffle"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_probs_space_keeps_learned_mass_and_unedited_weights(block: dict, mode: str, lam: float) -> None:
    weights, base = run(block, mode, lam=lam), learned(block)
    edit = block["edit"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, Q))
    torch.testing.assert_close((weights * edit).sum(-1), (base * edit).sum(-1))
    torch.testing.assert_close(weights[~edit], base[~edit], rtol=0, atol=0)
    assert (weights[~block["allowed"].expand_as(weights)] == 0).all()


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_uniform_probs_blend_formula(block: dict, lam: float) -> None:
    base, edit = learned(block), block["edit"]
    mass = (base * edit).sum(-1, keepdim=True)
    expected = torch.where(edit, (1 - lam) * base + lam * mass / edit.sum(-1, keepdim=True).clamp_min(1), base)
    torch.testing.assert_close(run(block, "uniform", lam=lam), expected)


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_logits_space_blend_formula(block: dict, lam: float) -> None:
    scores, edit, allowed = block["scores"], block["edit"], block["allowed"]
    count = edit.sum(-1, keepdim=True).clamp_min(1)
    blended = torch.where(edit, (1 - lam) * scores + lam / count, scores)
    expected = torch.softmax(blended.masked_fill(~allowed, torch.finfo(torch.float32).min), -1)
    torch.testing.assert_close(run(block, "uniform", space="logits", lam=lam), expected)


@pytest.mark.parametrize("edit_heads", [H, 1])  # edited entries per head, or one mask for every head (as attention)
def test_gaussian_logits_uses_a_dirichlet_vector_shared_by_rows(block: dict, edit_heads: int) -> None:
    """p over the edited keys is -log(U) normalised, one vector per (sample, head), whatever the row."""
    scores, edit, allowed = block["scores"], block["edit"][:, :edit_heads], block["allowed"]
    inter = Intervention(mode="gaussian", space="logits")
    weights = edited_weights(scores.clone(), allowed, edit, inter, block["coords"])
    heads = torch.arange(H).view(1, H, 1, 1)
    u = rng.uniform(block["coords"].sample_key.view(B, 1, 1, 1), 0, heads, block["key_abs"].view(1, 1, 1, K))
    p = torch.where(edit, -torch.log(u), 0.0)
    p = p / p.sum(-1, keepdim=True)
    expected = torch.softmax(torch.where(edit, p, scores).masked_fill(~allowed, torch.finfo(torch.float32).min), -1)
    torch.testing.assert_close(weights, expected)
    assert not torch.allclose(p[0, 0, -1], p[0, 1, -1])  # heads draw independently


def test_gaussian_normal_dist_is_a_softmax_of_scaled_normals(block: dict) -> None:
    weights = run(block, "gaussian", space="probs", dist="normal", sigma=2.0)
    base, edit = learned(block), block["edit"]
    target = (weights * edit) / (base * edit).sum(-1, keepdim=True)
    heads = torch.arange(H).view(1, H, 1, 1)
    z = rng.normal(block["coords"].sample_key.view(B, 1, 1, 1), 0, heads, block["key_abs"].view(1, 1, 1, K))
    expected = torch.softmax((2.0 * z).expand(B, H, Q, K).masked_fill(~edit, float("-inf")), -1)
    torch.testing.assert_close(target[:, :, 1:], expected[:, :, 1:])  # row 0 sees key 1-2 only: still a softmax


def test_knockout_zeroes_exactly_the_edited_keys_without_renormalising(block: dict) -> None:
    weights, base, edit = run(block, "knockout"), learned(block), block["edit"]
    assert (weights[edit] == 0).all()
    torch.testing.assert_close(weights[~edit], base[~edit], rtol=0, atol=0)
    torch.testing.assert_close(weights.sum(-1), 1 - (base * edit).sum(-1))
    torch.testing.assert_close(run(block, "knockout", lam=0.5)[edit], 0.5 * base[edit])


def test_identity_puts_the_row_on_its_own_key(block: dict) -> None:
    everything = block["allowed"].expand(B, H, Q, K)
    block = {**block, "edit": everything}
    weights = run(block, "identity")
    expected = (block["key_abs"][None, :] == block["query_abs"][:, None]).float().expand(B, H, Q, K)
    torch.testing.assert_close(weights, expected)


def test_sink_puts_all_edited_mass_on_the_first_edited_key(block: dict) -> None:
    weights, base, edit = run(block, "sink"), learned(block), block["edit"]
    torch.testing.assert_close(weights[..., 1], (base * edit).sum(-1))
    assert (weights[..., 2:4] == 0).all()


def test_shuffle_permutes_the_learned_weights_within_the_edited_keys(block: dict) -> None:
    weights, base, edit = run(block, "shuffle"), learned(block), block["edit"]
    for b, h, q in [(0, 0, 3), (1, 2, 2), (0, 1, 1)]:
        keys = edit[b, h, q]
        torch.testing.assert_close(weights[b, h, q][keys].sort().values, base[b, h, q][keys].sort().values)
    assert not torch.equal(weights, base)


def test_shuffle_within_is_a_permutation_on_the_mask_only() -> None:
    values = torch.arange(10.0).expand(2, 10)
    edit = torch.tensor([[False, True, True, False, True, True, False, False, True, False]] * 2)
    draws = torch.rand(2, 10)
    shuffled = shuffle_within(values, edit, draws)
    assert torch.equal(shuffled[~edit], values[~edit])
    assert torch.equal(shuffled[0][edit[0]].sort().values, values[0][edit[0]])
    order = draws[0][edit[0]].argsort()
    assert torch.equal(shuffled[0][edit[0]], values[0][edit[0]][order])


def test_shuffle_within_permutes_every_head_of_a_head_independent_mask_and_breaks_ties_by_position() -> None:
    """An edit mask shared by the heads ``(B, 1, Q, K)`` (``attn_heads=all``) permutes every head's row, each by its
    own draws; equal draws keep the keys' order, so a left-padded row (the same keys shifted) is permuted alike."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2, 4, 3, 12, generator=generator)
    edit = torch.rand(2, 1, 3, 12, generator=generator) < 0.6
    draws = torch.randint(0, 3, (2, 4, 3, 12), generator=generator) / 4.0  # many ties
    shuffled = shuffle_within(values, edit, draws)
    expected = values.clone()
    for b, h, q in itertools.product(range(2), range(4), range(3)):
        keys = [k for k in range(12) if edit[b, 0, q, k]]
        for key, source in zip(keys, sorted(keys, key=lambda k: draws[b, h, q, k].item()), strict=True):
            expected[b, h, q, key] = values[b, h, q, source]
    assert torch.equal(shuffled, expected)
    padded = shuffle_within(*(torch.nn.functional.pad(t, (5, 0)) for t in (values, edit, draws)))
    assert torch.equal(padded[..., 5:], shuffled)


def test_band_heads_keeps_the_quantile_band() -> None:
    scores = torch.zeros(1, 5, 1, 4)
    scores[0, :, 0, 0] = torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0])  # v_h = -score on the text key 0
    allowed = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    visual = torch.tensor([False, True, True, True]).view(1, 1, 1, 4)
    chosen = band_heads(scores, allowed, visual, (0.25, 0.5)).flatten()
    # ascending v: head0 (-4), head2 (-3), head4 (-2), head3 (-1), head1 (0) -> quantiles 0, .25, .5, .75, 1
    assert chosen.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("sides", [False, True])
def test_head_scores_are_minus_the_mean_over_each_rows_text_keys(sides: bool) -> None:
    """Every row its own causal keys; image keys 3..5, so a row's text keys before the image are 0..2 and after it
    6.. up to the row (none for rows 2..5): ``sides`` then takes the one side there is."""
    scores = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    visual = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    visual[..., 3:6] = True
    got = head_scores(scores, allowed, visual, sides)
    for b in range(2):
        for h in range(3):
            for q in range(9):
                before, after = scores[b, h, q, : min(q + 1, 3)], scores[b, h, q, 6 : q + 1]
                means = [side.mean() for side in (before, after) if side.numel()]
                text = torch.cat([before, after])
                expected = -sum(means) / len(means) if sides else -text.mean()
                torch.testing.assert_close(got[b, h, q], expected)


def _coordinates(
    sample: int = 7, layer: int = 3, first: int = 0, keys: range = range(5), memo: dict | None = None
) -> Coordinates:
    samples, firsts = torch.tensor([sample, sample + 1]), torch.tensor([first, first + 2])
    return Coordinates(samples, firsts, layer, keys, torch.arange(keys.stop - 1, keys.stop), memo)


def test_coordinates_depend_on_sample_layer_head_and_position_only() -> None:
    a = _coordinates().key_draws("uniform", 2)
    assert a.shape == (2, 2, 1, 5)
    rows_elsewhere = Coordinates(torch.tensor([7, 8]), torch.tensor([0, 2]), 3, range(5), torch.arange(4))
    assert torch.equal(a, rows_elsewhere.key_draws("uniform", 2))  # query rows do not matter
    assert not torch.equal(a, _coordinates(sample=8).key_draws("uniform", 2))
    assert not torch.equal(a, _coordinates(layer=4).key_draws("uniform", 2))
    assert not torch.equal(a[0, 0], a[0, 1])  # heads
    shifted = _coordinates(sample=8).key_draws("uniform", 2)  # row 0: sample 8 with no padding
    assert torch.equal(a[1, :, :, 2:], shifted[0, :, :, :3])  # positions count from the first non-padding token
    assert ((a > 0) & (a < 1)).all()


@pytest.mark.parametrize("dist", ["dirichlet", "uniform", "normal"])
def test_memo_draws_each_key_once_and_keeps_the_values(dist: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill, cached decoding steps, a step without KV cache and a sliding window read the memo: it grows at
    least twofold when keys beyond it are asked for, and every result equals a fresh draw at the same coordinates."""
    steps = (range(6), range(7), range(8), range(8), range(3, 9), range(9))
    fresh = [_coordinates(keys=keys).key_draws(dist, 3) for keys in steps + (range(13, 15),)]
    drawn: list[int] = []
    original = patterns._KEY_DRAWS[dist]
    monkeypatch.setitem(patterns._KEY_DRAWS, dist, lambda *c: drawn.append(c[-1].shape[-1]) or original(*c))
    memo: dict[str, torch.Tensor] = {}
    for keys, expected in zip(steps, fresh, strict=False):
        torch.testing.assert_close(_coordinates(keys=keys, memo=memo).key_draws(dist, 3), expected, rtol=0, atol=0)
    assert drawn == [6, 6]  # positions 0-5 at the prefill, then 6-11 for the next step, which covers the others
    assert memo[dist].shape == (2, 3, 1, 12)
    gap = _coordinates(keys=range(13, 15), memo=memo).key_draws(dist, 3)  # after a gap: drawn, not kept
    torch.testing.assert_close(gap, fresh[-1], rtol=0, atol=0)
    assert memo[dist].shape[-1] == 12


def test_layers_of_a_prompt_share_its_mixed_coordinates_and_draw_what_a_fresh_draw_gives() -> None:
    """Every layer of a prompt mixes the same head and key coordinates: they are worked out once, and each layer's
    draws equal a draw without them at the same coordinates. Only the latest key positions are kept (a sliding
    window asks for new ones every step)."""
    mixed: dict = {}
    for layer, keys in ((3, range(5)), (4, range(5)), (9, range(5)), (3, range(2, 7))):
        drawn = Coordinates(**{**_coordinates(layer=layer, keys=keys).__dict__, "mixed": mixed}).key_draws("normal", 3)
        fresh = _coordinates(layer=layer, keys=keys).key_draws("normal", 3)
        torch.testing.assert_close(drawn, fresh, rtol=0, atol=0)
        assert set(mixed) == {("heads", 3), "keys"} and mixed["keys"][0] == keys


def test_normal_draws_are_box_muller_of_the_uniform_streams_1_and_2() -> None:
    key, heads, positions = torch.tensor([5, 2**31]).view(2, 1, 1), torch.arange(3).view(1, 3, 1), torch.arange(-2, 6)
    u1, u2 = (rng.uniform(key, 4, heads, positions, stream) for stream in (1, 2))
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    torch.testing.assert_close(rng.normal(key, 4, heads, positions), expected, rtol=0, atol=0)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_uniform_draws_are_the_lowbias32_chain_of_their_coordinates() -> None:
    """u = (h + 1/2) / 2^32 rounded to float32, h folding each coordinate c into the key as
    h <- lowbias32(h xor lowbias32(c + 0x9E3779B9 mod 2^32)): a pure function of the coordinates."""
    keys, positions = [7, 2**32 - 1], range(-2, 5)
    drawn = rng.uniform(torch.tensor(keys).view(2, 1, 1), -1, torch.arange(3).view(1, 3, 1), torch.arange(-2, 5))
    for i, key in enumerate(keys):
        for head in range(3):
            for j, position in enumerate(positions):
                state = key
                for coord in (-1, head, position):
                    state = _lowbias32(state ^ _lowbias32((coord + 0x9E3779B9) & 0xFFFFFFFF))
                assert drawn[i, head, j] == torch.tensor((state + 0.5) / 2**32, dtype=torch.float32)


def test_uniform_draws_look_uniform() -> None:
    u = rng.uniform(123, torch.arange(100_000))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    z = rng.normal(123, torch.arange(100_000))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
