"""`lwm demo`: the whole workflow on embedded sample data, on CPU."""

from __future__ import annotations

import contextlib
import io

from orchestration.commands import add_examples
from orchestration.demo import workflow as demo


def run(args, extra) -> int:
    with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
        return demo.run(args.workdir)  # its progress goes to stdout; -q drops it


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", description="Sample books, images and videos → tokenizer → data jobs → three training stages → "
        "needle evaluation, all on CPU in a few minutes; everything is written under --workdir.")
    parser.add_argument("--workdir", default="demo_out", help="where the demo writes everything")
    parser.set_defaults(func=run)
    add_examples(parser, "lwm demo                        # writes demo_out/",
                 "lwm demo --workdir /tmp/lwm-demo -q   # no progress lines; errors still shown")
