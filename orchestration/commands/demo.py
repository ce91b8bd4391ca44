"""`lwm demo`: the whole workflow on embedded sample data, on CPU."""

from __future__ import annotations

from orchestration.demo import workflow as demo


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole workflow on embedded sample data, on CPU")
    parser.add_argument("--workdir", default="demo_out", help="where the demo writes everything")
    parser.set_defaults(func=lambda args, extra: demo.run(args.workdir))
