"""`python -m bench.chaos [--seed N] [--small] [--json FILE] [--keep]`: one fault-injection run;
prints the table and exits 1 unless nothing was lost and nothing done twice."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .harness import FULL, SMALL, Run, passed, render


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    p.add_argument("--seed", type=int, default=1, help="the seed of the load mix and the fault plan")
    p.add_argument("--small", action="store_true", help="the CI size: every fault kind once, ~40 workflows")
    p.add_argument("--workflows", type=int, help="override the number of workflows")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, service data)")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s chaos %(message)s")
    size = SMALL if args.small else FULL
    if args.workflows:
        size.workflows = args.workflows
    result = Run(args.seed, size, keep=args.keep).run()
    print(render(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
