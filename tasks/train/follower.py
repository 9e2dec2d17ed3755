"""A follower node of a multi-node train stage: `python -m tasks.train.follower --store ROOT`
(tasks/train/nodes.py says how the nodes meet)."""

from __future__ import annotations

import argparse
import logging
import sys

from tasks.train.nodes import follow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train.follower",
                                     description="Run one follower node of a multi-node train stage.")
    parser.add_argument("--store", required=True, help="the run's artifact root (the one the main node uses)")
    parser.add_argument("--credentials-block", default=None, help="prefect-aws AwsCredentials block for s3://")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return follow(args.store, args.credentials_block)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
