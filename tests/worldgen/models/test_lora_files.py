"""LoRA files on a model component (worldgen/models/lora_files.py) and switching weighted adapter sets
(worldgen/models/adapters.py): files are checked from their header (a pickle is never opened), a file that fits
no module leaves the model as it was, the base weights are never copied, and a cached active set is re-walked
only when it changes."""

from __future__ import annotations

import pickle

import diffusers
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

import worldgen.models.adapters as adapters
from worldgen.errors import ConfigError
from worldgen.models.adapters import activate_adapter, tuner_layers
from worldgen.models.lora_files import attach_lora_file, lora_file
from worldgen.models.presets import build_preset_component

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def save_lora(folder, name: str, seed: int, **components) -> str:
    """A diffusers-format LoRA file with random non-zero layers on fresh tiny `components` (unet, text_encoder)."""
    layers, metadata = {}, {}
    torch.manual_seed(seed)
    for component in components:
        model = build_preset_component("tiny", component)
        targets = TE_TARGETS if component == "text_encoder" else ["to_q", "to_k", "to_v", "to_out.0"]
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, model)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, weight_name=f"{name}.safetensors", **layers, **metadata
    )
    return str(folder / f"{name}.safetensors")


class Boom:
    """Unpickling this writes a file: the proof that a loader opened a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_never_opened(tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("style.safetensors", "style.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(Boom(marker)))
        with pytest.raises(ConfigError) as err:
            lora_file(tmp_path / name)
        assert err.value.path == "path"
    assert not marker.exists()
    with pytest.raises(ConfigError, match="not found"):
        lora_file(tmp_path / "gone.safetensors")
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="holds no LoRA weights.*conv_in"):
        lora_file(tmp_path / "model.safetensors")


def test_same_stem_in_two_folders_are_two_adapters(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / sub / "style.safetensors"))
    a, b = lora_file(tmp_path / "a" / "style.safetensors"), lora_file(tmp_path / "b" / "style.safetensors")
    assert a.name == b.name == "style" and a.key != b.key


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_keys_that_match_no_module_are_refused_and_leave_the_model_as_it_was(component, tmp_path):
    model = build_preset_component("tiny", component)
    before = {n: p.clone() for n, p in model.named_parameters()}
    keys = {f"{component}.no_such.block.lora_A.weight": torch.ones(2, 8)}
    keys |= {f"{component}.no_such.block.lora_B.weight": torch.ones(8, 2)}
    save_file(keys, str(tmp_path / "stray.safetensors"))
    spec = lora_file(tmp_path / "stray.safetensors")
    with pytest.raises(ConfigError) as err:
        attach_lora_file(model, spec, component)
    assert err.value.path == "lora.path" and err.value.file == spec.path
    assert f"{component}.no_such.block.lora_A.weight" in str(err.value)
    assert not list(tuner_layers(model))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())


def test_weighted_sets_are_switched_and_cached(tmp_path, monkeypatch):
    encoder = build_preset_component("tiny", "text_encoder")
    ids = torch.tensor([[0, 5, 9, 2]])
    base = encoder(ids).last_hidden_state
    first = lora_file(save_lora(tmp_path, "first", 1, text_encoder=True))
    second = lora_file(save_lora(tmp_path, "second", 2, text_encoder=True))
    assert attach_lora_file(encoder, first, "text_encoder")
    assert attach_lora_file(encoder, second, "text_encoder")
    unet = build_preset_component("tiny", "unet")
    assert not attach_lora_file(unet, first, "unet")  # no unet part: nothing to load, nothing wrong
    assert not list(tuner_layers(unet))

    walks = []
    monkeypatch.setattr(adapters, "tuner_layers", lambda m: walks.append(1) or tuner_layers(m))
    activate_adapter(encoder, None, [(first.key, 0.5), (second.key, 2.0)])
    layer = next(tuner_layers(encoder))
    assert layer.active_adapters == [first.key, second.key]
    assert layer.scaling == {first.key: 0.5 * 4 / 2, second.key: 2.0 * 4 / 2}
    assert not layer.lora_A[first.key].weight.requires_grad  # served, not trained
    mixed = encoder(ids).last_hidden_state
    activate_adapter(encoder, None, [(first.key, 0.5), (second.key, 2.0)])
    assert len(walks) == 1  # the same set again: no walk (a denoising loop's every step)
    assert not torch.equal(mixed, base)

    activate_adapter(encoder, None, ())
    assert torch.equal(encoder(ids).last_hidden_state, base)  # none active: exactly the base model
    assert len(walks) == 2


def test_lora_files_add_only_their_own_bytes_to_the_shared_base(tmp_path):
    """What a LoRA costs on a shared UNet: its adapter parameters; the base's tensors stay the same objects."""
    unet = build_preset_component("tiny", "unet")
    base = {n: p.data_ptr() for n, p in unet.named_parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    for name, seed in (("one", 1), ("two", 2)):
        attach_lora_file(unet, lora_file(save_lora(tmp_path, name, seed, unet=True)), "unet")
    params = dict(unet.named_parameters())
    lora_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if ".lora_" in n)
    kept = {n.replace(".base_layer", ""): p.data_ptr() for n, p in params.items() if ".lora_" not in n}
    assert kept == base  # not one base tensor copied
    assert 0 < lora_bytes < 0.15 * base_bytes
    print(f"tiny UNet: base {base_bytes} bytes, two LoRA files (rank 2) add {lora_bytes} bytes")
