"""A model's bytes known before loading it (worldgen/models/sizing.py): from the safetensors headers of a
local directory in the reference's dtype, from a preset's tiny build, unknown for a hub id not downloaded."""

from __future__ import annotations

import json
import struct

import pytest
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from worldgen.errors import ModelLoadError
from worldgen.model_ref import ModelRef
from worldgen.models.presets import build_preset_component
from worldgen.models.sizing import model_bytes


def parameters(subfolder: str) -> int:
    return sum(p.numel() for p in build_preset_component("tiny", subfolder).parameters())


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("float16", 2), ("bf16", 2), ("auto", 2)])
def test_a_local_unet_is_its_parameters_times_the_references_dtype(tiny_sd_dir, dtype, size):
    ref = ModelRef(source=str(tiny_sd_dir), subfolder="unet", dtype=dtype)
    assert model_bytes(ref, UNet2DConditionModel) == parameters("unet") * size


def test_float16_halves_a_float32_file_and_a_preset_counts_the_same(tiny_sd_dir):
    local = ModelRef(source=str(tiny_sd_dir), subfolder="text_encoder")
    full = model_bytes(local, CLIPTextModel)
    assert full == parameters("text_encoder") * 4
    assert model_bytes(local.model_copy(update={"dtype": "float16"}), CLIPTextModel) == full // 2
    assert model_bytes(ModelRef(source="preset:tiny", subfolder="text_encoder"), CLIPTextModel) == full


def test_what_holds_no_weights_is_zero_and_a_hub_id_not_downloaded_unknown(tiny_sd_dir):
    assert model_bytes(ModelRef(source=str(tiny_sd_dir), subfolder="tokenizer"), CLIPTokenizer) == 0
    missing = ModelRef(source="nobody-here/not-a-model", subfolder="unet")
    assert model_bytes(missing, UNet2DConditionModel) is None


def write_safetensors(path, tensors: dict) -> None:
    header = json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)  # the sizing reads no tensor data


def test_a_variant_reads_its_own_files_and_non_float_tensors_keep_their_size(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    write_safetensors(
        unet / "diffusion_pytorch_model.safetensors",
        {"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 400]},
         "ids": {"dtype": "I64", "shape": [3], "data_offsets": [400, 424]},
         "__metadata__": {"format": "pt"}},
    )  # fmt: skip
    write_safetensors(
        unet / "diffusion_pytorch_model.fp16.safetensors",
        {"w": {"dtype": "F16", "shape": [1000], "data_offsets": [0, 2000]}},
    )
    ref = ModelRef(source=str(tmp_path), subfolder="unet", dtype="float16")
    assert model_bytes(ref, UNet2DConditionModel) == 100 * 2 + 3 * 8
    assert model_bytes(ref.model_copy(update={"variant": "fp16"}), UNet2DConditionModel) == 1000 * 2


def test_a_damaged_header_is_a_clear_error_naming_the_file(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(
        ModelLoadError, match="diffusion_pytorch_model.safetensors' is not a safetensors file"
    ):
        model_bytes(ModelRef(source=str(tmp_path)), UNet2DConditionModel)
