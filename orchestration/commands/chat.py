"""`lwm chat`: ask a checkpoint about an image or a video (``trainer.inference.vision_chat``), one turn or many."""

from __future__ import annotations

import json
import os
import sys

from orchestration.commands import add_checkpoint_arguments, add_examples, add_sampling_arguments, sample_settings


def run(args, extra) -> int:
    from trainer.inference.vision_chat import check_media_path, check_vision_head, open_session, prompt_document

    if args.image and args.video:
        raise ValueError("give --image or --video, not both")
    if (args.image or args.video) and not args.vqgan:
        raise ValueError("--image and --video need --vqgan DIR (the VQGAN the checkpoint was trained with)")
    if args.max_frames < 1 or args.max_tokens < 0:
        raise ValueError(f"--max-frames must be >= 1 and --max-tokens >= 0, got {args.max_frames}, {args.max_tokens}")
    if args.image or args.video:  # refused before the weights load: a wrong path, a checkpoint that cannot see
        check_media_path(args.image or args.video)
        from trainer import checkpoint

        check_vision_head(checkpoint.restore_model_config(checkpoint.resolve_dir(args.ckpt), args.step))
    settings = sample_settings(args, max_new_tokens=max(args.max_tokens, 1))
    session = open_session(args.ckpt, args.tokenizer, vqgan=args.vqgan, sp=args.sp, step=args.step,
                           settings=settings, max_frames=args.max_frames)
    media = {"image": args.image, "video": args.video}
    questions = [args.prompt] if args.prompt is not None else _lines(sys.stdin)
    for index, question in enumerate(questions):
        turn = session.layout(question, **(media if index == 0 else {}))
        if index == 0 and args.dump_prompt:
            _dump(args.dump_prompt, prompt_document(turn.tokens, turn.vision_mask))
        if args.max_tokens == 0:
            return 0
        session.answer(turn, on_text=_write)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _lines(stream):
    """One question per non-empty line of ``stream``; end of input ends the conversation."""
    for line in stream:
        if line.strip():
            yield line.strip()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _dump(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f)
    print(f"wrote the prompt ({len(document['tokens'])} tokens) to {path}", file=sys.stderr)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat about an image or a video with a checkpoint (one turn, or many from stdin)",
        description="Ask a checkpoint about an image or a video, laid out as LWM's vision chat feeds its models: "
        "BOS, 'You are a helpful assistant. USER: {question}\\n', <vision>, each frame's 256 VQGAN codes then "
        "<eof> (the last <eov>), </vision>, ' ASSISTANT:'. A video gives its frames at its own rate, all of them "
        "up to --max-frames, else --max-frames spread evenly (LWM's rule); each frame is resized and centre-cropped "
        "to 256x256 as the data jobs do. With --prompt: one answer, streamed. Without: one question per line of "
        "standard input, each later turn reusing the key/value cache of the conversation so far; end of input "
        "exits. The prompt is prefilled with ring attention over --sp devices; a video too long for the "
        "checkpoint's context or the devices' memory is refused, naming the frame count that fits.",
    )
    add_checkpoint_arguments(parser, tokenizer=True)
    parser.add_argument("--vqgan", metavar="DIR", help="VQGAN directory (lwm convert vqgan-import) encoding the frames")
    parser.add_argument("--image", metavar="FILE", help="an image to ask about")
    parser.add_argument("--video", metavar="FILE", help="a video to ask about")
    parser.add_argument("--max-frames", type=int, default=8,
                        help="most frames of --video, spread evenly when it has more (LWM's default 8)")
    parser.add_argument("--prompt", help="the question: answer once and exit (default: one question a line of stdin)")
    add_sampling_arguments(parser, max_tokens_help="most answer tokens a turn (stops earlier at EOS); 0 samples nothing")
    parser.add_argument("--dump-prompt", metavar="OUT.json",
                        help='write the first turn\'s prompt as {"tokens": [...], "vision_mask": [...]}')
    parser.set_defaults(func=run)
    add_examples(parser,
                 "lwm chat --ckpt runs/stages/chat-1024 --tokenizer tokenizer.model --vqgan vqgan_small_random "
                 "--video raw/video_text/videos/video-0-0000.mp4 --prompt 'What is moving?'",
                 "lwm chat --ckpt runs/stages/chat-1024 --tokenizer tokenizer.model --vqgan vqgan_small_random "
                 "--image picture.png --max-tokens 0 --dump-prompt prompt.json",
                 "lwm chat --ckpt runs/stages/chat-1024 --tokenizer tokenizer.model --vqgan vqgan_small_random "
                 "--image picture.png   # then one question a line; each turn reuses the cache")
