"""python -m effkernels profile NAME [--input-size N] [--csv PATH]: the per-layer profile
(parameters, multiply-adds, activation traffic with and without effkernels' fusion) of an
effkernels.models model; see effkernels.profile."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effkernels")
    commands = parser.add_subparsers(dest="command", required=True)
    prof = commands.add_parser("profile", help="per-layer params, MACs and activation bytes")
    prof.add_argument("name", help="an effkernels.models name, e.g. mobilenetv2_100")
    prof.add_argument("--input-size", type=int, default=None,
                      help="input height = width (default: the model's own resolution)")
    prof.add_argument("--num-classes", type=int, default=1000)
    prof.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)

    from . import models, profile

    if args.name not in models.list_models():
        parser.error(f"unknown model {args.name!r}; one of: {', '.join(models.list_models())}")
    model = models.create_model(args.name, num_classes=args.num_classes)
    result = profile(model, args.input_size)
    print(result)
    if args.csv:
        result.to_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
