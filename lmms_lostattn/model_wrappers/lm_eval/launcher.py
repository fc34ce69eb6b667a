"""``lostattn-lm-eval``: lm-eval's command line with the lostattn models registered and their statistics in its
results; every lm-eval flag works as in ``lm-eval run``.

lm-eval 0.4.13 discovers no models from other packages (no entry points, no ``--plugins``): a model registers by
being imported before ``--model`` is resolved, which this command does before handing over to
``lm_eval.__main__.cli_evaluate``. List values may be written plainly in ``--model_args``
(``attn_layers=18,19,20``), as with lmms-eval.

It exits 2 where the plugin refused the run (its arguments, the installed versions, the checkpoint's family), with
the message alone, or where lm-eval produced no results; lm-eval's own errors end it as they end ``lm-eval``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

_MODEL_ARGS = "--model_args"


def _is_model_args(flag: str) -> bool:
    """``--model_args``, its short form ``-a``, or an abbreviation argparse takes for it (``--model_``: no other
    flag of ``lm-eval run`` starts so)."""
    return flag == "-a" or (len(flag) > len("--model") and _MODEL_ARGS.startswith(flag))


def bracket_model_args(argv: list[str], split: Callable[[str], list[str]]) -> list[str]:
    """``argv`` with each ``--model_args`` value's plain lists bracketed (JSON values are left as they are). A plugin
    argument given twice, in one value or across them (lm-eval merges every ``--model_args`` value, the last one
    winning), and a JSON value given with other values after one ``--model_args`` (lm-eval keeps the JSON alone)
    are a :class:`~lmms_lostattn.config.spec.SpecError`."""
    from lmms_lostattn.config.spec import SpecError
    from lmms_lostattn.model_wrappers.common.plugin import bracket_list_values, refuse_repeated

    out: list[str] = []
    names: list[str] = []
    values: list[str] | None = None  # those of the ``--model_args`` being read

    def bracketed(value: str) -> str:
        if value.lstrip().startswith("{"):
            with suppress(ValueError):  # lm-eval says what is wrong with a malformed one
                parsed = json.loads(value)
                names.extend(parsed if isinstance(parsed, dict) else ())
            return value
        names.extend(piece.partition("=")[0].strip() for piece in split(value.strip()) if "=" in piece)
        return bracket_list_values(value, split)

    for arg in argv:
        flag, eq, value = arg.partition("=")
        if _is_model_args(flag) and eq:
            out.append(f"{flag}={bracketed(value)}")
            values = None
            continue
        if arg.startswith("-a") and len(arg) > 2:  # argparse's attached short form, -aVALUE
            out.append(f"-a{bracketed(arg[2:])}")
            values = None
            continue
        if arg.startswith("-"):
            values = [] if _is_model_args(arg) else None
        elif values is not None:
            values.append(arg)
            if len(values) > 1 and any(value.lstrip().startswith("{") for value in values):
                raise SpecError("lostattn: a JSON --model_args value was given with other values after one "
                                "--model_args, and lm-eval would keep the JSON alone; give each its own --model_args")
            arg = bracketed(arg)
        out.append(arg)
    refuse_repeated(names)
    return out


def saved_under(*args: Any, evaluation_tracker: Any = None, **kwargs: Any) -> tuple[Path, str] | None:
    """Where lm-eval saves the run's results file: ``<output_path>/<model>/results_<date>.json``, or
    ``<stem>_<date>.json`` beside an ``--output_path`` that names a ``.json`` file."""
    output = getattr(evaluation_tracker, "output_path", None)
    if not output:
        return None
    path = Path(output)
    return (path.parent, f"{path.stem}_*.json") if path.suffix == ".json" else (path, "*/results_*.json")


def main() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lostattn-lm-eval needs lm-evaluation-harness: pip install 'lmms-lostattn[lm-eval]'")
    from lmms_lostattn.compat.internals import internal
    from lmms_lostattn.model_wrappers.common.exits import REFUSALS, HostRuns, exit_refused
    from lmms_lostattn.model_wrappers.lm_eval import models  # noqa: F401  (registers lostattn-hf*)
    from lmms_lostattn.model_wrappers.lm_eval.reporting import install

    try:
        argv = bracket_model_args(sys.argv[1:], internal("lm_eval._cli.utils", "split_top_level"))
    except REFUSALS as error:
        exit_refused(error)
    sys.argv = [sys.argv[0], *argv]
    install()
    runs = HostRuns("lostattn-lm-eval", has_results=lambda results: results is not None, saved_under=saved_under)
    runs.run("lm_eval.__main__:cli_evaluate", "lm_eval.evaluator", "simple_evaluate")


if __name__ == "__main__":
    main()
