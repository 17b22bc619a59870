"""`exgra-med prepare <dataset> ...`: turn a raw data set into training / VQA records.

Each data set lives in its own module `exgra_med.data.prepare.<module>` with a `main(argv)`; the
module is imported only when its data set is asked for.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from exgra_med.errors import HelpFormatter

# command-line name -> module under exgra_med.data.prepare
DATASETS: dict[str, str] = {
    "easy-vqa": "easy_vqa",
    "vqa-rad": "vqa_rad",
    "slake": "slake",
    "pathvqa": "pathvqa",
    "omnimedvqa": "omnimedvqa",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `prepare <dataset> [args]` to that data set's `main`; returns the exit code."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="exgra-med prepare",
        description="Turn a raw data set into training / VQA records. "
        "Run `exgra-med prepare <dataset> --help` for the options of one data set.",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which data set to prepare")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of that data set")
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    module_name = f"{__name__}.{DATASETS[ns.dataset]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its own imports is missing
            raise
        print(
            f"exgra-med prepare: {ns.dataset!r} is not available in this installation "
            f"(module {module_name} not found)",
            file=sys.stderr,
        )
        return 2
    return int(module.main(ns.args) or 0)
