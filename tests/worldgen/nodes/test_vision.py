"""Vision-language blocks (role `vlm`): the offline image-stats describer, the OpenAI-compatible API with
image parts (over real HTTP against the local test server) and a local transformers captioner (a tiny random
VisionEncoderDecoder saved with save_pretrained)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import worldgen as wg
from tests.openai_server import serve_openai
from worldgen.errors import ConfigError
from worldgen.nodes.vision import as_pil_images, colour_name, dominant_colours, image_stats
from worldgen.registry import block_types, create_block


def _red() -> Image.Image:
    return Image.new("RGB", (64, 48), (255, 0, 0))


def _half_black_white() -> Image.Image:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    return Image.fromarray(pixels)


# ---- inputs ------------------------------------------------------------------------------------------
def test_vlm_blocks_are_registered():
    assert {"vlm/image_stats", "vlm/openai", "vlm/transformers"} <= set(block_types())
    block = create_block("vlm/image_stats")
    assert block.role == "vlm"
    assert set(block.input_ports()) == {"images", "prompt", "context"}
    assert block.input_ports()["images"].kind is wg.PortKind.IMAGE
    assert set(block.output_ports()) == {"text"}


def test_every_image_form_becomes_a_list_of_rgb_images(tmp_path):
    red = _red()
    path = tmp_path / "red.png"
    red.save(path)
    tensor = torch.zeros(2, 3, 48, 64)
    tensor[:, 0] = 1.0
    forms = {
        "tensor": (tensor, 2),
        "one tensor image": (tensor[0], 1),
        "array": (tensor.numpy(), 2),
        "pil": (red, 1),
        "rgba pil": (red.convert("RGBA"), 1),
        "pil list": ([red, red], 2),
        "path": (str(path), 1),
        "path list": ([str(path), path], 2),
        "artifact refs": ([{"path": str(path), "kind": "image"}], 1),
        "mixed": ([red, str(path), tensor], 4),
    }
    for name, (value, count) in forms.items():
        images = as_pil_images(value)
        assert len(images) == count, name
        for image in images:
            assert image.mode == "RGB" and image.size == (64, 48), name
            assert image.getpixel((10, 10)) == (255, 0, 0), name


def test_bad_image_inputs_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        as_pil_images(str(tmp_path / "missing.png"))
    with pytest.raises(ConfigError, match="cannot read an image from a int"):
        as_pil_images([3])
    with pytest.raises(ConfigError, match="empty"):
        as_pil_images([])
    with pytest.raises(ConfigError, match="shape"):
        as_pil_images(torch.zeros(1, 2, 8, 8))


# ---- vlm/image_stats ---------------------------------------------------------------------------------
def test_image_stats_pure_red():
    text = create_block("vlm/image_stats")(images=_red())["text"]
    assert text.startswith("Image 1: 64×48 pixels (landscape)")
    assert "dominant colours: red #FF0000 (100%)" in text
    # Rec. 709 luma of pure red is 0.2126: a saturated but dim colour.
    assert "brightness 0.21 (dim)" in text
    assert "contrast 0.00 (uniform)" in text
    assert "highly colourful" in text
    stats = image_stats(_red())
    assert stats["brightness"] == pytest.approx(0.2126, abs=1e-4)
    assert stats["colours"] == [("red", "#FF0000", 1.0)]


def test_image_stats_half_black_half_white():
    stats = image_stats(_half_black_white())
    assert stats["brightness"] == pytest.approx(0.5, abs=1e-6)
    assert stats["contrast"] == pytest.approx(0.5, abs=1e-6)
    assert stats["colourfulness"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(stats["colours"]) == [("black", "#000000", 0.5), ("white", "#FFFFFF", 0.5)]
    text = create_block("vlm/image_stats")(images=_half_black_white())["text"]
    assert "black #000000 (50%)" in text and "white #FFFFFF (50%)" in text
    assert "brightness 0.50 (balanced)" in text and "brighter toward the right" in text


def test_image_stats_names_colours_and_limits_their_number():
    assert colour_name((1.0, 1.0, 1.0)) == "white"
    assert colour_name((0.28, 0.24, 0.55)) == "dark slate blue"
    assert colour_name((0.0, 0.0, 0.5)) == "navy"
    four = np.zeros((40, 40, 3), dtype=np.uint8)
    four[:20, :20], four[:20, 20:], four[20:, :20], four[20:, 20:] = (
        (255, 0, 0),
        (0, 0, 255),
        (0, 128, 0),
        (255, 255, 0),
    )
    image = Image.fromarray(four)
    names = {name for name, _, _ in dominant_colours(image, max_colours=4)}
    assert names == {"red", "blue", "green", "yellow"}
    assert len(dominant_colours(image, max_colours=2)) == 2
    text = create_block("vlm/image_stats", {"max_colours": 1})(images=image)["text"]
    assert text.count("%") == 1
    with pytest.raises(ConfigError, match="max_colours"):
        create_block("vlm/image_stats", {"max_colours": 0})


def test_image_stats_is_deterministic_and_numbers_each_image():
    images = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    block = create_block("vlm/image_stats")
    first = block(images=images, prompt="ignored", context={"also": "ignored"})["text"]
    assert first == create_block("vlm/image_stats")(images=images)["text"]
    lines = first.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Image 1", "Image 2", "Image 3"]
    assert all("128×96 pixels" in line for line in lines)


def test_image_stats_in_a_graph(tmp_path):
    path = tmp_path / "bw.png"
    _half_black_white().save(path)
    g = wg.Graph("describe")
    g.add_node("vlm/image_stats", id="vlm")
    g.expose_input("images", "vlm.images")
    g.expose_output("text", "vlm.text")
    assert g.run({"images": [str(path)]})["text"].startswith("Image 1: 64×48 pixels")


# ---- vlm/openai --------------------------------------------------------------------------------------
def _decode_png(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)))
    assert image.format == "PNG"
    return image


def test_openai_vlm_sends_text_and_one_image_part_per_image(monkeypatch):
    key = "sk-vision-test-0123456789abcdef"
    monkeypatch.setenv("WG_TEST_VLM_KEY", key)
    with serve_openai(responses=["A red rectangle above a black and white one."], api_key=key) as server:
        monkeypatch.setenv("WG_TEST_VLM_URL", server.url)
        block = create_block(
            "vlm/openai",
            {
                "model": "test-vlm",
                "base_url": "${env:WG_TEST_VLM_URL}",
                "api_key": "${env:WG_TEST_VLM_KEY}",
                "detail": "low",
                "max_tokens": 64,
            },
        )
        images = [_red(), _half_black_white().resize((32, 24))]
        out = block(images=images)
    assert out["text"] == "A red rectangle above a black and white one."
    (request,) = server.chat_requests
    assert request.authorized
    assert request.body["model"] == "test-vlm" and request.body["max_tokens"] == 64
    (message,) = request.messages
    assert message["role"] == "user"
    text, first, *parts = message["content"]
    assert text == {"type": "text", "text": "Describe precisely what these images show."}
    # each image named by a text part before it (the numbering block 4 uses)
    assert first == {"type": "text", "text": "Image 1"} and parts[1] == {"type": "text", "text": "Image 2"}
    parts = parts[::2]
    assert [p["type"] for p in parts] == ["image_url", "image_url"]
    assert [p["image_url"]["detail"] for p in parts] == ["low", "low"]
    decoded = [_decode_png(p["image_url"]["url"]) for p in parts]
    assert [d.size for d in decoded] == [(64, 48), (32, 24)]
    assert decoded[0].convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    # the key comes from the environment only: never in the config, its dump or the recorded request
    dump = str(block.config_dict()) + repr(block) + str(block.config.model_dump())
    assert key not in dump and "${env:WG_TEST_VLM_KEY}" in dump
    assert key not in str(request.body) and key not in str(request.headers)


def test_openai_vlm_prompt_input_context_template_and_tensor_images(monkeypatch):
    monkeypatch.setenv("WG_TEST_VLM_KEY", "sk-test")
    with serve_openai() as server:  # echoes the user text back
        config = {
            "model": "m",
            "base_url": server.url,
            "api_key": "${env:WG_TEST_VLM_KEY}",
            "prompt": "Describe the {{ what }}.",
        }
        block = create_block("vlm/openai", config)
        tensor = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        # the server echoes every text part: the prompt, then the images' names
        names = "Image 1Image 2Image 3"
        assert (
            block(images=tensor, context={"what": "harbor"})["text"] == "echo: Describe the harbor." + names
        )
        assert block(images=tensor, prompt="What colour?")["text"] == "echo: What colour?" + names
    parts = server.chat_requests[0].messages[0]["content"]
    assert [p["text"] for p in parts[1::2]] == ["Image 1", "Image 2", "Image 3"]
    pictures = parts[2::2]
    assert len(pictures) == 3 and all(p["image_url"]["detail"] == "auto" for p in pictures)
    assert all(_decode_png(p["image_url"]["url"]).size == (16, 16) for p in pictures)


def test_openai_vlm_refuses_literal_keys():
    with pytest.raises(ConfigError, match=r"\$\{env:NAME\}") as info:
        create_block("vlm/openai", {"model": "m", "api_key": "sk-literal-secret"})
    assert "sk-literal-secret" not in str(info.value)


# ---- vlm/transformers --------------------------------------------------------------------------------
CAPTION_WORDS = (
    "a",
    "the",
    "harbor",
    "at",
    "dawn",
    "ship",
    "sea",
    "sky",
    "red",
    "blue",
    "tower",
    "city",
    "boat",
)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random ViT → GPT-2 VisionEncoderDecoder captioner with its image processor and a word-level
    tokenizer, written by save_pretrained (built offline from configs, seeded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>", *CAPTION_WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    gpt2 = GPT2Config(
        vocab_size=len(words),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        add_cross_attention=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.5,  # large random weights: the greedy caption is words, not an instant end
    )
    model = VisionEncoderDecoderModel(encoder=ViTModel(vit), decoder=GPT2LMHeadModel(gpt2))
    with torch.no_grad():  # special tokens never win the greedy pick: every caption is max_new_tokens words
        model.decoder.lm_head.weight[:4] = 0.0
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    directory = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _caption_images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))


def test_transformers_vlm_captions_deterministically(tiny_vlm_dir):
    from transformers import VisionEncoderDecoderModel

    block = create_block("vlm/transformers", {"model": str(tiny_vlm_dir), "max_new_tokens": 6})
    assert block.model_class() is VisionEncoderDecoderModel
    text = block(images=_caption_images())["text"]
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Image 1", "Image 2"]
    for line in lines:
        words = line.split(": ", 1)[1].split()
        assert len(words) == 6 and set(words) <= set(CAPTION_WORDS), line
    assert block(images=_caption_images())["text"] == text
    # a second block with the same reference shares the loaded model, and says the same
    again = create_block("vlm/transformers", {"model": str(tiny_vlm_dir), "max_new_tokens": 6})
    assert again(images=list(as_pil_images(_caption_images())))["text"] == text
    assert again.model is block.model


def test_transformers_vlm_in_a_graph_and_after_save_load(tiny_vlm_dir, tmp_path):
    expected = create_block("vlm/transformers", {"model": str(tiny_vlm_dir), "max_new_tokens": 6})(
        images=_caption_images()
    )["text"]
    g = wg.Graph("caption")
    g.add_node("vlm/transformers", id="vlm", config={"model": str(tiny_vlm_dir), "max_new_tokens": 6})
    g.expose_input("images", "vlm.images")
    g.expose_output("text", "vlm.text")
    assert g.run({"images": _caption_images()})["text"] == expected
    g.save(tmp_path / "graph")
    loaded = wg.Graph.load(tmp_path / "graph")
    assert loaded.run({"images": _caption_images()})["text"] == expected


def test_transformers_vlm_prompt_is_the_input_else_the_rendered_template(tiny_vlm_dir):
    config = {"model": str(tiny_vlm_dir), "prompt": "Describe the {{ what }}."}
    block = create_block("vlm/transformers", config)
    assert block.instruction(None, {"what": "harbor"}) == "Describe the harbor."
    assert block.instruction("What colour?", {"what": "harbor"}) == "What colour?"
    assert create_block("vlm/transformers", {"model": str(tiny_vlm_dir)}).instruction(None, None) is None


def test_transformers_vlm_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no model class 'NoSuchModel'"):
        create_block("vlm/transformers", {"model": str(tmp_path), "architecture": "NoSuchModel"})
    block = create_block("vlm/transformers", {"model": "preset:tiny"})
    with pytest.raises(wg.ModelLoadError, match="no built-in"):
        block(images=_red())


# ---- videos and sounds -------------------------------------------------------------------------------
@pytest.fixture
def artifact_files(tmp_path):
    """Block 3 of an episode with every kind: a PNG, a 9-frame MP4 of a square moving left (8 fps), a WAV."""
    from worldgen.media import write_audio, write_video

    _red().save(tmp_path / "a.png")
    clip = np.zeros((9, 3, 48, 64), dtype=np.float32)
    for t in range(9):
        clip[t, :, 18:30, 40 - 3 * t : 52 - 3 * t] = 1.0
    write_video(tmp_path / "b.mp4", clip, fps=8)
    tone = 0.8 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    write_audio(tmp_path / "c.wav", tone[None], sample_rate=16000)
    return [str(tmp_path / n) for n in ("a.png", "b.mp4", "c.wav")]


def test_image_stats_describes_every_artifact_kind(artifact_files):
    text = create_block("vlm/image_stats", {"frames": 3})(images=artifact_files)["text"]
    image, video, audio = text.splitlines()
    assert image.startswith("Image 1: 64×48 pixels (landscape); dominant colours: red #FF0000 (100%)")
    assert video.startswith("Video 2: 9 frames, 8 fps, 1.1 s; motion ")
    assert (
        "motion to the left); frames 1, 5, 9 show: 64×48 pixels (landscape); dominant colours: black" in video
    )
    assert audio.startswith("Audio 3: 0.50 s, 16000 Hz, mono; loudness RMS -4.9 dBFS, peak -1.9 dBFS (loud)")
    assert "spectral centroid 44" in audio
    assert create_block("vlm/image_stats", {"frames": 3})(images=artifact_files)["text"] == text


def test_frames_is_validated_on_every_vlm_block(tiny_vlm_dir):
    configs = {
        "vlm/image_stats": {},
        "vlm/openai": {"model": "m"},
        "vlm/transformers": {"model": str(tiny_vlm_dir)},
    }
    for block_type, config in configs.items():
        assert create_block(block_type, config).config.frames == 4
        for bad, bound in ((0, "greater than or equal to 1"), (33, "less than or equal to 32")):
            with pytest.raises(ConfigError, match=f"config.frames: Input should be {bound} \\(got {bad}\\)"):
                create_block(block_type, {**config, "frames": bad})


def test_openai_vlm_sends_a_clip_as_its_frames_and_a_sound_as_its_measures(monkeypatch, artifact_files):
    monkeypatch.setenv("WG_TEST_VLM_KEY", "sk-test")
    with serve_openai(responses=["A red card, a square sliding left, a tone."]) as server:
        config = {"model": "m", "base_url": server.url, "api_key": "${env:WG_TEST_VLM_KEY}", "frames": 3}
        assert create_block("vlm/openai", config)(images=artifact_files)["text"].startswith("A red card")
    (message,) = server.chat_requests[0].messages
    kinds = [p["type"] for p in message["content"]]
    assert kinds == ["text", "text", "image_url", "text", "image_url", "image_url", "image_url", "text"]
    prompt, image, picture, clip, *frames, sound = message["content"]
    assert image["text"] == "Image 1" and _decode_png(picture["image_url"]["url"]).size == (64, 48)
    assert clip["text"] == "Video 2: frames 1, 5, 9 of 9, 8 fps, 1.1 s"
    decoded = [np.asarray(_decode_png(f["image_url"]["url"]).convert("RGB")) for f in frames]
    assert [d.shape for d in decoded] == [(48, 64, 3)] * 3
    # the square moves left by 3 pixels a frame: its bright columns in the sampled frames 1, 5 and 9
    lefts = [int(np.argmax(d[24, :, 0] > 128)) for d in decoded]
    assert lefts[0] > lefts[1] > lefts[2] and lefts[0] - lefts[2] == pytest.approx(24, abs=2)
    assert sound["text"].startswith("Audio 3 (a sound: its measures, not the sound itself): 0.50 s, 16000 Hz")
    assert "dBFS" in sound["text"]


def test_transformers_vlm_captions_each_sampled_frame_and_states_a_sounds_measures(
    tiny_vlm_dir, artifact_files
):
    block = create_block("vlm/transformers", {"model": str(tiny_vlm_dir), "max_new_tokens": 3, "frames": 2})
    text = block(images=artifact_files)["text"]
    image, video, audio = text.splitlines()
    assert image.startswith("Image 1: ") and len(image.split(": ", 1)[1].split()) == 3
    head, frame_1, frame_9 = video.split("; frame ")[0], *video.split("; frame ")[1:]
    assert head.startswith("Video 2: 9 frames, 8 fps, 1.1 s; motion ") and "to the left" in head
    for caption, number in ((frame_1, "1"), (frame_9, "9")):
        label, words = caption.split(": ", 1)
        assert label == number and set(words.split()) <= set(CAPTION_WORDS), caption
    assert audio.startswith("Audio 3: 0.50 s, 16000 Hz, mono; loudness")
    assert block(images=artifact_files)["text"] == text  # greedy: the same artifacts, the same text
