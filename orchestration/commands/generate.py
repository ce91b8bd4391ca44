"""`lwm generate`: text, an image or a video from a checkpoint (``trainer.inference.sampler``)."""

from __future__ import annotations

import os
import sys

import numpy as np

from orchestration.commands import (add_checkpoint_arguments, add_examples, add_sampling_arguments, open_sampler,
                                    progress, sample_settings)


def run(args, extra) -> int:
    from trainer.inference.sampler import decode_frames, encode_prompt, frame_codes

    vision_out = args.image or args.video
    if args.image and args.video:
        raise ValueError("give --image or --video, not both")
    if vision_out and not args.vqgan:
        raise ValueError("--image and --video need --vqgan DIR (the VQGAN that decodes the codes)")
    if args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if args.first_frame and (not args.video or args.frames < 2):
        raise ValueError("--first-frame continues a --video of at least 2 --frames")
    if args.first_frame and args.first_frame != "generate":
        from trainer.inference.vision_chat import check_media_path

        check_media_path(args.first_frame)
    tokenizer, sampler = open_sampler(args)
    settings = sample_settings(args, eos_id=tokenizer.eos_id)
    modality = "video" if args.video else "image"
    prompt = encode_prompt(tokenizer, _vision_request(args, modality) if vision_out else args.prompt, chat=args.chat,
                           vision=bool(vision_out))
    if vision_out:
        return _vision(args, tokenizer, sampler, prompt, settings, frame_codes, decode_frames)
    printed = [""]
    generated: list[int] = []

    def stream(row: int, token: int) -> None:  # print the text's new suffix as tokens arrive
        generated.append(token)
        text = tokenizer.decode(generated)
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    sampler.generate([prompt], settings, on_token=stream)
    sys.stdout.write("\n")
    return 0


def _vision_request(args, modality: str) -> str:
    from pipelines.tokens.prompts import generation_request

    return generation_request(modality, args.prompt) if args.chat else args.prompt  # plain: caption, <vision>


def _vision(args, tokenizer, sampler, prompt, settings, frame_codes, decode_frames) -> int:
    from pipelines.tokens.vqgan import VQGAN
    from trainer.inference.sampler import encode_prompt, unconditional_prompt

    frames = args.frames if args.video else 1
    vqgan = VQGAN.load(args.vqgan)
    scale = args.cfg_scale if args.cfg_scale is not None else (1.0 if args.video else 5.0)
    uncond = unconditional_prompt(tokenizer)
    if args.video and args.first_frame:
        if args.first_frame == "generate":  # LWM's way: the first frame drawn as an image, with image guidance
            progress(args, f"generating the first frame as an image (cfg scale {args.first_frame_cfg_scale:g}) ...")
            image_prompt = encode_prompt(tokenizer, _vision_request(args, "image"), chat=args.chat, vision=True)
            (ids,) = sampler.generate_guided([image_prompt], 1, settings, cfg_scale=args.first_frame_cfg_scale,
                                             unconditional=uncond)
            first = frame_codes(ids)
        else:
            first = _encoded_picture(args.first_frame, vqgan)
        progress(args, f"generating {frames - 1} more frame(s) (cfg scale {scale:g}) ...")
        codes = sampler.continue_video(prompt, first, frames, settings, cfg_scale=scale, unconditional=uncond)
    else:
        progress(args, f"generating {frames} frame(s) × 257 vision tokens (cfg scale {scale:g}) ...")
        (ids,) = sampler.generate_guided([prompt], frames, settings, cfg_scale=scale, unconditional=uncond)
        codes = frame_codes(ids)
    pixels = decode_frames(codes, vqgan)
    os.makedirs(os.path.dirname(os.path.abspath(args.image or args.video)), exist_ok=True)
    if args.image:
        from PIL import Image

        Image.fromarray(pixels[0]).save(args.image)
        print(f"wrote {args.image}")
    else:
        from trainer.evaluation.synthetic_videos import encode_video

        encode_video(args.video, np.asarray(pixels), args.fps)
        print(f"wrote {args.video} ({frames} frames at {args.fps} fps)")
    return 0


def _encoded_picture(path: str, vqgan) -> np.ndarray:
    """Codes ``[1, 16, 16]`` of an image file, decoded and encoded as the image-text job does."""
    from pipelines.tokens import media
    from trainer.inference.vision_chat import check_media_path

    with open(check_media_path(path), "rb") as f:
        data = f.read()
    try:
        pixels = media.decode_image(data)[None]
    except media.MediaError as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from None
    return vqgan.encode(vqgan.preprocess(pixels))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        description="Sample from a checkpoint. The prompt is encoded as text was in training (BOS, then the "
        "text; no template) unless --chat wraps it in LWM's chat template. Long prompts are prefilled with "
        "ring attention over --sp devices. Text streams to stdout as it is generated.",
    )
    add_checkpoint_arguments(parser, tokenizer=True)
    parser.add_argument("--prompt", required=True, help="prompt text (for --image/--video: what to draw)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in LWM's chat template (You are a helpful assistant. USER: ... ASSISTANT:)")
    add_sampling_arguments(parser, max_tokens_help="most new text tokens (stops earlier at EOS)")
    parser.add_argument("--image", metavar="OUT.png", help="generate an image instead of text, written here")
    parser.add_argument("--video", metavar="OUT.mp4", help="generate a video instead of text, written here")
    parser.add_argument("--frames", type=int, default=4, help="frames of --video")
    parser.add_argument("--fps", type=int, default=4, help="frame rate of the --video file")
    parser.add_argument("--vqgan", metavar="DIR", help="VQGAN directory (lwm convert vqgan-import) decoding vision codes")
    parser.add_argument("--cfg-scale", type=float,
                        help="classifier-free guidance of --image/--video: uncond + scale × (cond − uncond) against "
                        "BOS <vision> (default 5 for images, 1 for videos, as LWM's scripts; 1 = no guidance)")
    parser.add_argument("--first-frame", metavar="generate|IMAGE",
                        help="--video continues from a first frame: 'generate' draws it as an image first (LWM's "
                        "way), or an image file gives it; default: all frames drawn in one go")
    parser.add_argument("--first-frame-cfg-scale", type=float, default=5.0,
                        help="guidance of the first frame drawn with --first-frame generate (LWM's image scale)")
    parser.set_defaults(func=run)
    add_examples(parser,
                 'lwm generate --ckpt runs/tiny --tokenizer tok.model --prompt "The old sailor" --max-tokens 64 '
                 '--temperature 0.8 --top-p 0.9',
                 'lwm generate --ckpt ckpt/ --tokenizer tok.model --prompt "What is RingAttention?" --chat --sp 4',
                 'lwm generate --ckpt ckpt/ --tokenizer tok.model --prompt "a red circle" --chat --image out.png '
                 '--vqgan vqgan/',
                 'lwm generate --ckpt ckpt/ --tokenizer tok.model --prompt "a red circle moving left" --video out.mp4 '
                 '--frames 8 --vqgan vqgan/',
                 'lwm generate --ckpt ckpt/ --tokenizer tok.model --prompt "a red circle moving left" --video out.mp4 '
                 '--frames 8 --vqgan vqgan/ --first-frame generate   # LWM\'s way: the first frame drawn as an image')
