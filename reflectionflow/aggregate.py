"""`python -m reflectionflow.aggregate`: scaling table and plot of a sweep, or merging of shard outputs.

python -m reflectionflow.aggregate <multirun dir> [--wandb]
    scaling.md, scaling.csv and scaling.png into the directory (a multirun does this at its end);
    --wandb logs them into the W&B project and group the jobs logged to.
python -m reflectionflow.aggregate --merge <shard run dir> [<shard run dir> ...] --out <dir>
    one GenEval-layout directory with one result.json, as an unsharded run writes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from reflectionflow.search.aggregation import aggregate
from reflectionflow.search.errors import SetupError
from reflectionflow.search.sharding import merge_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reflectionflow.aggregate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "dirs", nargs="+", help="a multirun directory, or with --merge the shards' run directories"
    )
    parser.add_argument("--merge", action="store_true", help="join shard run directories into --out")
    parser.add_argument("--out", help="merged run directory (with --merge)")
    parser.add_argument("--wandb", action="store_true", help="log the table and plot to the jobs' W&B group")
    args = parser.parse_args(argv)
    if args.merge != (args.out is not None):
        parser.error("--merge and --out go together")
    if not args.merge and len(args.dirs) != 1:
        parser.error("aggregate one directory at a time (or --merge several)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.merge:
            result = merge_runs(args.dirs, args.out)
            print(
                f"merged {len(result['merged_from'])} shards, {result['prompts']} prompts, "
                f"mean score {result['mean_score']} -> {args.out}"
            )
            return
        aggregate(args.dirs[0], log_wandb=args.wandb)
    except SetupError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
