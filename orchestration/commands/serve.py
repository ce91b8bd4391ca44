"""`lwm serve`: a checkpoint behind an OpenAI-compatible API (``orchestration.serving.server``)."""

from __future__ import annotations

import argparse

from orchestration.commands import add_checkpoint_arguments

EXAMPLES = """\
examples:
  lwm serve --ckpt runs/tiny --tokenizer tokenizer.model
  lwm serve --ckpt runs/tiny --tokenizer tokenizer.model --port 8001 --max-batch 16 --served-name tiny
  lwm serve --ckpt runs/tiny --tokenizer tokenizer.model --api-key-env LWM_API_KEY --host 0.0.0.0
  lwm serve --ckpt runs/vision --tokenizer tokenizer.model --vqgan vqgan/ --media-dir media/
"""


def run(args, extra) -> int:
    from orchestration.serving.server import ServeConfig, serve

    fields = {f for f in ServeConfig.__dataclass_fields__}
    return serve(ServeConfig(**{k: v for k, v in vars(args).items() if k in fields}))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint over the OpenAI API (chat, completions, streaming)",
        description="Serve a checkpoint over the OpenAI API: GET /v1/models, POST /v1/chat/completions (LWM's "
        "chat template; image_url/video_url parts with --vqgan), POST /v1/completions (a raw prompt), GET "
        "/health. Requests join the running batch at the next decode step (continuous batching); a "
        "conversation's next turn reuses its cached prefix. SIGTERM finishes the requests in flight, then "
        "exits 0.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, tokenizer=True)
    parser.add_argument("--vqgan", metavar="DIR", help="VQGAN directory encoding images and videos (default: text only)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--sp", type=int, default=1, help="devices of the ring the prompts and cache are split over")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (cache rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    parser.add_argument("--max-context", type=int, help="tokens per request, prompt + max_tokens "
                        "(default: the checkpoint's max_position_embeddings)")
    parser.add_argument("--prefix-cache", type=int, default=16,
                        help="finished conversations kept for their next turn (0: off; least recently used evicted)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames taken from a video (uniformly)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MB (413 above)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the API key every /v1 request must send (never logged)")
    parser.add_argument("--media-dir", metavar="DIR", help="allow image/video paths under DIR (default: data: URLs only)")
    parser.add_argument("--served-name", help="the model id (default: the checkpoint's run name)")
    parser.set_defaults(func=run)
