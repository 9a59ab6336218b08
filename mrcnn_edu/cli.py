"""The ``mrcnn-edu`` command.

mrcnn-edu demo            # the README's main job
mrcnn-edu demo --toolkit  # fit a tiny conv net with the explicit-autograd toolkit
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mrcnn-edu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on synthetic shapes, evaluate, write pictures")
    demo.add_argument("--toolkit", action="store_true", help="the tiny conv-net toolkit demo")
    demo.add_argument("--out", default=None, help="output folder (default runs/<demo name>)")
    demo.add_argument("--steps", type=int, default=300, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.steps <= 0:
            parser.error("--steps must be positive")
        from . import toolkit_demo

        result = toolkit_demo.run(
            out_dir=args.out or "runs/toolkit_demo",
            steps=args.steps,
            seed=args.seed,
            progress=not args.no_progress,
        )
        return 0 if result["losses"][-1] < result["losses"][0] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
