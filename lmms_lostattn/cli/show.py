"""``lostattn show``: per document, a PNG of the image with the last prompt token's attention laid on its patches,
per decoder layer, learned and (under ``--model_args attn=...``, or a run's own) as the edited model ran it. The
documents are image files with questions, documents of an lmms-eval task, or those of a run's tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from lmms_lostattn.config.spec import InterventionSpec, SpecError
from lmms_lostattn.families import UnsupportedFamilyError
from lmms_lostattn.inspection.attention_maps import load
from lmms_lostattn.inspection.figures import save_figure
from lmms_lostattn.intervention.prompt import InterventionError


def _model_args(text: str) -> dict[str, str]:
    """``attn=gaussian,attn_layers=18,19`` -> ``{"attn": "gaussian", "attn_layers": "[18,19]"}``, split as
    lmms-eval splits ``model_args``."""
    from lmms_lostattn.model_wrappers.lmms_eval.base import model_args_pieces

    pairs = model_args_pieces(text)
    bad = [name for name, equals, _ in pairs if not equals]
    if bad:
        raise SpecError(f"lostattn show: --model_args pieces without '=': {', '.join(bad)}")
    return {name.strip(): value.strip() for name, _, value in pairs}


def _doc_ids(text: str) -> list[int]:
    try:
        ids = [int(piece) for piece in text.split(",")]
    except ValueError:
        raise SpecError(f"lostattn show: --doc-ids {text!r}: give document ids, e.g. 0,3,7") from None
    return ids


def _files(args: argparse.Namespace) -> list[tuple[str, Image.Image, str]]:
    """``(file stem, image, question)`` per document of --image/--question."""
    if len(args.image) != len(args.question):
        raise SpecError(
            f"lostattn show: {len(args.image)} --image for {len(args.question)} --question; give one each per document"
        )
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        raise SpecError(f"lostattn show: no image file {', '.join(missing)}")
    documents = []
    for path, question in zip(args.image, args.question, strict=True):
        with Image.open(path) as opened:
            documents.append((Path(path).stem, opened.convert("RGB"), question))
    return documents


def _run_model(run_path: Path) -> tuple[str, dict[str, str], list[str]]:
    """The pretrained model, plugin arguments (``attn*``) and tasks of an lmms-eval run folder."""
    from lmms_lostattn.reporting.runs import RunError, load_run

    try:
        run = load_run(run_path)
    except RunError as error:
        raise SpecError(f"lostattn show: {error}") from None
    if run.layout.harness != "lmms-eval":
        raise SpecError(f"lostattn show: {run.path} is an {run.layout.harness} run; its documents have no images")
    model_args = _model_args(str(run.results["config"].get("model_args", "")))
    attn_args = {name: value for name, value in model_args.items()
                 if name in InterventionSpec.ARGS and name.startswith("attn")}
    return model_args.get("pretrained", ""), attn_args, [task for task in run.tasks if task not in run.groups]


def _sources(args: argparse.Namespace) -> tuple[str, dict[str, str], list[tuple[str, Image.Image, str]]]:
    """The model, its plugin arguments and the documents, from the command's one source of documents."""
    from lmms_lostattn.model_wrappers.lmms_eval.documents import task_documents

    given = [name for name, value in (("--image", args.image), ("--task", args.task), ("--run", args.run)) if value]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise SpecError(f"lostattn show: give the documents one way: --image/--question, --task or --run (got {got})")
    pretrained, attn_args = args.pretrained, _model_args(args.model_args)
    unused = [name for name in attn_args if name in InterventionSpec.ARGS and not name.startswith("attn")]
    if unused:
        raise SpecError(f"lostattn show: --model_args {', '.join(unused)}: show draws attention maps and takes only "
                        "the attn* arguments")
    if args.run is not None:
        run_pretrained, run_args, tasks = _run_model(args.run)
        pretrained, attn_args = pretrained or run_pretrained, {**run_args, **attn_args}
    elif args.task is not None:
        tasks = [args.task]
    if not pretrained:
        raise SpecError("lostattn show: --pretrained is needed (a checkpoint directory or hub id)")
    if args.image:
        return pretrained, attn_args, _files(args)
    ids = _doc_ids(args.doc_ids)
    documents = [doc for task in tasks for doc in task_documents(task, ids, args.include_path)]
    return pretrained, attn_args, [(f"{doc.task}_{doc.doc_id}", doc.image, doc.text) for doc in documents]


def show(args: argparse.Namespace) -> int:
    """Write one PNG per document into ``args.output``; 2 with a message for what cannot be shown."""
    try:
        pretrained, attn_args, documents = _sources(args)
        inspector = load(pretrained, attn_args, args.layers)
    except (SpecError, UnsupportedFamilyError, OSError) as error:
        print(f"lostattn show: {error}" if isinstance(error, OSError) else error, file=sys.stderr)
        return 2
    for index, (stem, image, question) in enumerate(documents):
        try:
            maps = inspector.maps(image, question, inspector.layers)
        except (SpecError, InterventionError) as error:
            print(f"{error} ({stem})", file=sys.stderr)
            return 2
        path = args.output / f"{index:02d}_{stem}.png"
        print(save_figure(inspector.seen_image(image), question, maps, path))
    return 0
