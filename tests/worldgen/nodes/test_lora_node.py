"""`adapter/lora` (worldgen/nodes/lora.py): a light node handing model blocks a checked LoRA file and its weight;
the blocks that take adapters get an optional `lora` input (the others do not), which refuses anything else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from worldgen.errors import ConfigError
from worldgen.models.lora_files import LoraFile
from worldgen.ports import PortKind
from worldgen.registry import create_block


@pytest.fixture
def style(tmp_path) -> str:
    path = tmp_path / "style.safetensors"
    save_file(
        {"unet.x.lora_A.weight": torch.zeros(1, 1), "unet.x.lora_B.weight": torch.zeros(1, 1)}, str(path)
    )
    return str(path)


def test_the_node_hands_on_the_file_and_this_calls_weight(style):
    node = create_block("adapter/lora", {"path": style, "weight": 0.8})
    assert node.inline and node.output_ports()["lora"].kind is PortKind.ADAPTER
    spec = node()["lora"]
    assert isinstance(spec, LoraFile) and (spec.name, spec.weight, spec.path) == ("style", 0.8, style)
    assert node(weight=-0.5)["lora"].weight == -0.5
    assert create_block("adapter/lora", {"path": style, "name": "ink"})()["lora"].name == "ink"


def test_bad_weights_and_files_name_the_field(style, tmp_path):
    node = create_block("adapter/lora", {"path": style})
    for bad in ("strong", float("nan"), True):
        with pytest.raises(ConfigError) as err:
            node.check_inputs({"weight": bad})
        assert err.value.path == "weight"
    missing = create_block("adapter/lora", {"path": str(tmp_path / "gone.safetensors")})
    with pytest.raises(ConfigError, match="not found") as err:
        missing.check_inputs({})
    assert err.value.path == "path"


def test_model_blocks_that_take_adapters_have_a_lora_input():
    model = {"source": "preset:tiny"}
    unet = create_block("backbone/unet2d", {"model": {**model, "subfolder": "unet"}})
    encoder = create_block("conditioner/clip_text", {"model": {**model, "subfolder": "text_encoder"}})
    vae = create_block("codec/vae", {"model": {**model, "subfolder": "vae"}, "mode": "decode"})
    assert unet.input_ports()["lora"].optional and "lora" in encoder.input_ports()
    assert "lora" not in vae.input_ports()  # the VAE takes no adapter
    assert (unet.lora_component(), encoder.lora_component()) == ("unet", "text_encoder")
    with pytest.raises(ConfigError, match="adapter/lora") as err:
        encoder(token_ids=torch.zeros(1, 4, dtype=torch.long), lora="style.safetensors")
    assert err.value.path == "lora"
