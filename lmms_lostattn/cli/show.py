"""``lostattn show``: per document, a PNG of the image with the last prompt token's attention laid on its patches,
per decoder layer, learned and (under ``--model_args attn=...``) as the edited model ran it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image

from lmms_lostattn.config.spec import SpecError, parse_layers
from lmms_lostattn.families import UnsupportedFamilyError
from lmms_lostattn.inspection.attention_maps import load
from lmms_lostattn.inspection.figures import save_figure
from lmms_lostattn.intervention.prompt import InterventionError
from lmms_lostattn.model_wrappers.common.plugin import bracket_list_values


def _model_args(text: str) -> dict[str, str]:
    """``attn=gaussian,attn_layers=18,19`` -> ``{"attn": "gaussian", "attn_layers": "[18,19]"}``."""
    if not text.strip():
        return {}
    pieces = bracket_list_values(text, lambda whole: re.split(r",(?![^\[]*\])", whole))
    pairs = [piece.partition("=") for piece in re.split(r",(?![^\[]*\])", pieces)]
    bad = [name for name, equals, _ in pairs if not equals]
    if bad:
        raise SpecError(f"lostattn show: --model_args pieces without '=': {', '.join(bad)}")
    return {name.strip(): value.strip() for name, _, value in pairs}


def show(args: argparse.Namespace) -> int:
    """Write one PNG per document into ``args.output``; 2 with a message for what cannot be shown."""
    if len(args.image) != len(args.question):
        print(f"lostattn show: {len(args.image)} --image for {len(args.question)} --question; give one each per "
              "document", file=sys.stderr)
        return 2
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        print(f"lostattn show: no image file {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        inspector = load(args.pretrained, _model_args(args.model_args))
    except (SpecError, UnsupportedFamilyError, OSError) as error:
        print(f"lostattn show: {error}" if isinstance(error, OSError) else error, file=sys.stderr)
        return 2
    try:
        layers = parse_layers(args.layers, inspector.num_layers)
    except SpecError as error:
        print(f"lostattn show: --layers {args.layers}: {error}", file=sys.stderr)
        return 2
    for index, (image_path, question) in enumerate(zip(args.image, args.question, strict=True)):
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        try:
            maps = inspector.maps(image, question, layers)
        except (SpecError, InterventionError) as error:
            print(f"{error} ({image_path})", file=sys.stderr)
            return 2
        print(save_figure(image, question, maps, args.output / f"{index:02d}_{Path(image_path).stem}.png"))
    return 0
