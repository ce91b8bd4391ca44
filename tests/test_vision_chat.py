"""Vision chat: LWM's prompt layout (golden), multi-turn cache reuse equal to recomputing, bad input refused."""

import dataclasses
import json
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from orchestration import cli
from pipelines.tokens import media
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import vocab
from trainer import checkpoint
from trainer.evaluation.synthetic_videos import encode_video
from trainer.inference import predictor
from trainer.inference import sampler as sample
from trainer.inference import vision_chat
from trainer.model import PRESETS, init_params

CONFIG = dataclasses.replace(PRESETS["tiny"], attention_block_q=32, attention_block_kv=32, mlp_chunk_size=64,
                             init_std=0.2, remat_policy="none", max_position_embeddings=1024)
QUESTION = "What is in it?"


class CodesFromPixels:
    """A stand-in VQGAN whose codes are a frame's pixels (16×16 samples of the red channel), so a test can
    read back which frames a prompt holds."""

    input_range = (0.0, 255.0)

    def preprocess(self, frames):
        assert frames.dtype == np.uint8 and frames.shape[1:] == (256, 256, 3)
        return frames.astype(np.float32)

    def encode(self, x):
        return x[:, 8::16, 8::16, 0].astype(np.int32)


def _video(path: pathlib.Path, count: int, fps: int = 5) -> pathlib.Path:
    """Frames of grey levels 10·i (distinguishable after lossy coding), not square (the crop matters)."""
    frames = np.stack([np.full((240, 320, 3), 10 * i, np.uint8) for i in range(count)])
    return encode_video(path, frames, fps)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return TextTokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    checkpoint.save_params(path, init_params(CONFIG, jax.random.key(0)), CONFIG)
    return path


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """Room for 20 frames."""
    path = tmp_path_factory.mktemp("chat") / "long"
    config = dataclasses.replace(CONFIG, max_position_embeddings=8192)
    checkpoint.save_params(path, init_params(config, jax.random.key(0)), config)
    return path


def _session(ckpt, tokenizer, sp=1, **settings):
    settings = sample.SampleSettings(**{"max_new_tokens": 8, **settings})
    return vision_chat.ChatSession(sample.Sampler(ckpt, sp=sp), tokenizer, CodesFromPixels(), settings=settings)


def _golden(tokenizer, codes_Fx256):
    """The prompt LWM's vision chat feeds, built piece by piece."""
    frames = [list(c) + [vocab.EOF_ID] for c in codes_Fx256]
    frames[-1][-1] = vocab.EOV_ID
    pieces = [([tokenizer.bos_id], False), (tokenizer.encode(f"You are a helpful assistant. USER: {QUESTION}\n"), False),
              (tokenizer.encode("<vision>"), False), ([t for f in frames for t in f], True),
              (tokenizer.encode("</vision>"), False), (tokenizer.encode(" ASSISTANT:"), False)]
    return ([int(t) for ids, _ in pieces for t in ids], [m for ids, m in pieces for _ in ids])


def test_an_image_prompt_is_lwms_layout_with_one_bos(ckpt, tokenizer, tmp_path):
    from PIL import Image

    picture = np.zeros((300, 400, 3), np.uint8)
    picture[:, 200:] = 200  # the crop keeps the centre 300×300 square, then resizes it to 256
    Image.fromarray(picture).save(tmp_path / "half.png")
    turn = _session(ckpt, tokenizer).layout(QUESTION, image=str(tmp_path / "half.png"))
    expected_codes = CodesFromPixels().encode(media.decode_image((tmp_path / "half.png").read_bytes())[None])
    tokens, mask = _golden(tokenizer, expected_codes.reshape(1, 256))
    assert turn.tokens.tolist() == tokens and turn.vision_mask.tolist() == mask
    assert turn.tokens.tolist().count(tokenizer.bos_id) == 1
    assert turn.vision.indices == (0,) and sum(mask) == 257


@pytest.mark.parametrize("max_frames,indices", [(6, [0, 3, 7, 11, 15, 19]), (30, list(range(20)))])
def test_a_video_prompt_holds_lwms_frames_in_order(long_ckpt, tokenizer, tmp_path, max_frames, indices):
    video = _video(tmp_path / "grey.mp4", 20)
    session = _session(long_ckpt, tokenizer)
    session.max_frames = max_frames
    turn = session.layout(QUESTION, video=str(video))
    assert list(turn.vision.indices) == indices and turn.vision.total == 20
    assert indices == media.sample_frame_indices(20, max_frames).tolist()
    levels = turn.vision.codes.reshape(len(indices), 256).mean(axis=1)
    np.testing.assert_allclose(levels, 10 * np.array(indices), atol=3)  # which frames: their grey levels
    tokens, mask = _golden(tokenizer, turn.vision.codes.reshape(len(indices), 256))
    assert turn.tokens.tolist() == tokens and turn.vision_mask.tolist() == mask


def test_lwms_frame_rule_truncates_linspace():
    assert media.sample_frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert media.sample_frame_indices(100, 3).tolist() == [0, 49, 99]
    assert media.sample_frame_indices(3, 8).tolist() == [0, 1, 2]
    assert np.array_equal(media.sample_frame_indices(1000, 7), np.linspace(0, 999, 7).astype(int))


@pytest.mark.parametrize("sp", [1, 4])
def test_a_later_turn_reuses_the_cache_and_equals_recomputing_the_conversation(ckpt, tokenizer, tmp_path, sp):
    video = _video(tmp_path / "grey.mp4", 3)
    session = _session(ckpt, tokenizer, sp=sp, max_new_tokens=5)
    session.ask(QUESTION, video=str(video))
    turn = session.layout("And then?")
    forked = session.sampler.fork(session.context)
    extended = session.sampler.extend(forked, turn.tokens, turn.vision_mask)
    tokens, mask = session.conversation()
    assert tokens[:len(session.prompt[0])].tolist() == session.prompt[0].tolist()
    full = np.concatenate([tokens, turn.tokens])
    full_mask = np.concatenate([mask, turn.vision_mask])
    pad = -len(full) % CONFIG.mlp_chunk_size
    want = predictor.logits(ckpt, np.pad(full, (0, pad))[None], np.pad(full_mask, (0, pad))[None])[0]
    fed = len(session.context.pending) + len(turn.tokens)  # the last answer's last token (or EOS), then the turn
    np.testing.assert_allclose(extended.text_logits, want[len(full) - fed:len(full)], atol=1e-4, rtol=0)
    assert extended.length == len(full)
    # and the greedy answer is the one a fresh prefill of the whole conversation gives
    second = session.ask("And then?")
    again = session.sampler.generate([full], sample.SampleSettings(max_new_tokens=5, eos_id=tokenizer.eos_id),
                                     vision_masks=[full_mask])[0]
    assert second == tokenizer.decode(again)
    with pytest.raises(ValueError, match="already extended"):
        session.sampler.extend(forked, [])  # used once: its cache was donated to the next step


def test_dump_prompt_writes_the_exact_ids_and_samples_nothing(ckpt, tokenizer, tokenizer_path, tmp_path, vqgan_dir,
                                                              capsys):
    video = _video(tmp_path / "grey.mp4", 3)
    out = tmp_path / "prompt.json"
    code = cli.main(["chat", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir),
                     "--video", str(video), "--prompt", QUESTION, "--max-tokens", "0", "--dump-prompt", str(out)])
    assert code == 0 and capsys.readouterr().out == ""
    document = json.loads(out.read_text())
    from pipelines.tokens.vqgan import VQGAN

    vq = VQGAN.load(str(vqgan_dir))
    codes = vq.encode(vq.preprocess(media.decode_video(str(video), media.VideoConfig(native=True, max_frames=8))))
    assert (document["tokens"], document["vision_mask"]) == _golden(tokenizer, codes.reshape(3, 256))


@pytest.mark.slow
def test_the_cli_answers_one_question_a_line_of_stdin(ckpt, tokenizer_path, vqgan_dir, tmp_path, monkeypatch, capsys):
    import io

    video = _video(tmp_path / "grey.mp4", 2)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n\nAnd then?\n"))
    code = cli.main(["chat", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir),
                     "--video", str(video), "--max-tokens", "4", "--sp", "2"])
    assert code == 0 and capsys.readouterr().out.count("\n") == 2


def _bad_inputs(tmp_path: pathlib.Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01garbage" * 200)
    (tmp_path / "folder.mp4").mkdir()
    subprocess.run([media.ffmpeg_tools().ffmpeg, "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", "-y",
                    str(tmp_path / "audio.m4a")], check=True)
    return {"missing": ("--video", "no such file"), "empty.mp4": ("--video", "empty_file"),
            "garbage.mp4": ("--video", "corrupt_video"), "folder.mp4": ("--video", "a directory"),
            "audio.m4a": ("--video", "no_video_stream"), "garbage.png": ("--image", "corrupt_image")}


def test_every_bad_input_is_one_line_and_exit_2(ckpt, tokenizer_path, vqgan_dir, tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"not a picture")
    base = ["chat", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir), "--prompt", "q"]
    for name, (flag, reason) in cases.items():
        code = cli.main(base + [flag, str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and reason in err and "Traceback" not in err, (name, err)


def test_a_video_too_long_is_refused_naming_the_frames_that_fit(ckpt, tokenizer_path, vqgan_dir, tmp_path, capsys):
    video = _video(tmp_path / "long.mp4", 12)
    code = cli.main(["chat", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--vqgan", str(vqgan_dir),
                     "--video", str(video), "--prompt", "q", "--max-frames", "12", "--max-tokens", "16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "12 frames" in err and "max_position_embeddings 1024" in err
    assert "at most 3 frames fit: use --max-frames 3" in err  # (1024 - 16 - text) // 257 = 3


def test_a_checkpoint_without_a_vision_head_is_refused_for_vision(tmp_path, tokenizer_path, vqgan_dir, capsys):
    config = dataclasses.replace(CONFIG, vision_vocab_size=0)
    checkpoint.save_params(tmp_path / "text", init_params(config, jax.random.key(0)), config)
    video = _video(tmp_path / "grey.mp4", 2)
    code = cli.main(["chat", "--ckpt", str(tmp_path / "text"), "--tokenizer", tokenizer_path, "--vqgan",
                     str(vqgan_dir), "--video", str(video), "--prompt", "q"])
    err = capsys.readouterr().err
    assert code == 2 and "no vision head" in err and err.count("\n") == 1
    code = cli.main(["chat", "--ckpt", str(tmp_path / "text"), "--tokenizer", tokenizer_path, "--video", str(video),
                     "--prompt", "q"])
    assert code == 2 and "--vqgan" in capsys.readouterr().err
