"""`lwm demo`: the whole workflow on embedded sample data, on CPU."""

from __future__ import annotations

from orchestration.commands import add_examples, progress_on_stdout
from orchestration.demo import workflow as demo


def run(args, extra) -> int:
    with progress_on_stdout(args):
        return demo.run(args.workdir)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", description="Sample books, images and videos → tokenizer → data jobs → a plan of tiny training stages → "
        "needle evaluation, all on CPU in a few minutes; everything is written under --workdir.")
    parser.add_argument("--workdir", default="demo_out", help="where the demo writes everything")
    parser.set_defaults(func=run)
    add_examples(parser, "lwm demo                        # writes demo_out/",
                 "lwm demo --workdir /tmp/lwm-demo -q   # no progress lines; errors still shown")
