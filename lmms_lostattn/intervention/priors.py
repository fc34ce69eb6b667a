"""The released code's image priors: probability vectors over an image's patches, from the image or the vision tower.

Pure tensor functions. For an image of P patches (row-major over the patch grid):

* ``vision_attention``: with A the attention weights ``(H, S, S)`` of the vision encoder's last layer (S = P + 1
  tokens with the class token first, as CLIP; S = P without one, as SigLIP), a_j = mean over heads h and patch
  queries i of A[h, i, j] for each patch key j, over the patches that reach the language model (a class token, and
  the first patch where the model drops the tower's first token, are dropped from queries and keys, not
  renormalised), prior = softmax(a);
* ``complexity``: on the gray image g = 0.299 r + 0.587 g + 0.114 b (values in [0, 1]), each patch scores
  c = mean |g[y, x+1] - g[y, x]| + mean |g[y+1, x] - g[y, x]| + var(g) (population variance, within the patch);
  the scores are min-max normalised over the image's patches, c' = (c - min) / (max - min + 1e-8), and
  prior = softmax(c') over the patches that reach the language model (the first dropped where the model drops the
  tower's first token and the tower has no class token).
"""

from __future__ import annotations

import torch

GRAY = (0.299, 0.587, 0.114)
MINMAX_EPS = 1e-8


def eager_attention_weights(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``(N, H, S, S)`` softmax attention of a CLIP/SigLIP-style (unmasked) vision attention module on its input,
    computed as its eager kernel does (``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``)."""
    batch, length, _ = hidden_states.shape
    shape = (batch, length, module.num_heads, module.head_dim)
    query = module.q_proj(hidden_states).view(shape).transpose(1, 2).float()
    key = module.k_proj(hidden_states).view(shape).transpose(1, 2).float()
    return (query @ key.transpose(-1, -2) * module.scale).softmax(dim=-1)


def vision_attention_prior(weights: torch.Tensor, first: int) -> torch.Tensor:
    """``(N, S - first)`` prior from last-layer vision attention weights ``(N, H, S, S)`` over the tower's tokens
    ``first``.. (``first`` = 1 drops a class token, or a first patch the model never sees; module docstring)."""
    received = weights[:, :, first:, first:].float().mean(dim=2).mean(dim=1)
    return received.softmax(dim=-1)


def patch_complexity(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Complexity scores ``(N, rows * cols)`` of images ``(N, 3, H, W)`` in [0, 1], split into a ``grid`` of equal
    patches (H and W divisible by it), min-max normalised per image (module docstring)."""
    rows, cols = grid
    batch, _, height, width = images.shape
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} image does not split into a {rows}x{cols} grid of equal patches")
    weights = torch.tensor(GRAY, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    gray = (images.float() * weights).sum(dim=1)
    patches = gray.view(batch, rows, height // rows, cols, width // cols).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(batch, rows * cols, height // rows, width // cols)
    across = (patches[..., :, 1:] - patches[..., :, :-1]).abs().mean(dim=(-2, -1))
    down = (patches[..., 1:, :] - patches[..., :-1, :]).abs().mean(dim=(-2, -1))
    score = across + down + patches.flatten(-2).var(dim=-1, unbiased=False)
    low, high = score.amin(dim=-1, keepdim=True), score.amax(dim=-1, keepdim=True)
    return (score - low) / (high - low + MINMAX_EPS)


def complexity_prior(images: torch.Tensor, grid: tuple[int, int], first: int = 0) -> torch.Tensor:
    """``(N, P - first)`` prior: softmax of :func:`patch_complexity` over the patches ``first``.. (``first`` = 1
    drops a first patch the model never sees, as in :func:`vision_attention_prior`)."""
    return patch_complexity(images, grid)[:, first:].softmax(dim=-1)
