"""GPT-NeoX / Pythia (``gpt_neox``): ``attention`` (one fused ``query_key_value`` projection, so ``noise_qkv`` is
refused) and ``mlp``; no image tokens.

With ``use_parallel_residual`` (every Pythia checkpoint) a layer adds both updates to the stream it read,
``Y = X + dA + dF`` with ``dA = attn(norm X)`` and ``dF = mlp(norm' X)``: there is no stream between the two. The
statistics take them in the order of the sum: the attention update on ``X -> X + dA``, the FFN update on
``X + dA -> Y`` (the same stream the FFN update of a sequential layer is measured on). Without it the layer is
pre-norm and sequential, measured as every other family.
"""

from __future__ import annotations

from lmms_lostattn.families.base import FamilyAdapter

GPT_NEOX = FamilyAdapter(
    family="gpt-neox",
    model_types=("gpt_neox",),
    layer_style="parallel",
    attention="attention",
    qkv=("query_key_value",),
    images=False,
)
