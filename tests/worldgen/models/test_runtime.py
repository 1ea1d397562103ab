"""A model reference's acceleration options (worldgen/models/runtime.py), applied after loading: channels-last
conv weights, the attention backend, torch.compile; outputs unchanged on the CPU."""

from __future__ import annotations

import pytest
import torch

from worldgen.errors import ModelLoadError
from worldgen.model_ref import ModelRef, Runtime
from worldgen.models.loading import load_component, resolve_dtype
from worldgen.models.presets import build_preset_component
from worldgen.models.runtime import apply_runtime


def unet(**runtime):
    from diffusers import UNet2DConditionModel

    return load_component(
        ModelRef(source="preset:tiny", subfolder="unet", runtime=runtime), UNet2DConditionModel
    )


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, model.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 7, model.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return model(sample, torch.tensor([10]), encoder_hidden_states=text, return_dict=False)[0]


def conv_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_changes_the_conv_weights_layout_not_the_output():
    plain, fast = unet(), unet(channels_last=True)
    assert not any(
        w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(plain) if w.shape[-1] > 1
    )
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(fast))
    torch.testing.assert_close(unet_out(fast), unet_out(plain), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("backend", "processor"), [("sdpa", "AttnProcessor2_0"), ("math", "AttnProcessor")])
def test_attention_switches_the_processor_and_keeps_the_output(backend, processor):
    plain, switched = unet(), unet(attention="math" if backend == "sdpa" else "sdpa")
    apply_runtime(switched, Runtime(attention=backend))  # from the other backend: a real switch either way
    assert {type(p).__name__ for p in switched.attn_processors.values()} == {processor}
    torch.testing.assert_close(unet_out(switched), unet_out(plain), atol=1e-5, rtol=0)


def test_attention_of_a_text_encoder_is_set_through_transformers():
    from transformers import CLIPTextModel

    ref = ModelRef(source="preset:tiny", subfolder="text_encoder", runtime={"attention": "eager"})
    encoder = load_component(ref, CLIPTextModel)
    assert encoder.config._attn_implementation == "eager"


def test_a_family_with_its_own_attention_refuses_the_switch_naming_the_option():
    model = build_preset_component("flux-tiny", "transformer")
    with pytest.raises(ModelLoadError, match=r"runtime.attention 'sdpa'.*FluxAttnProcessor"):
        apply_runtime(model, Runtime(attention="sdpa"), "model 'preset:flux-tiny'")


def test_compile_compiles_the_model_in_place_keeping_its_class():
    from diffusers import UNet2DConditionModel

    model = unet(compile="reduce-overhead")
    assert isinstance(model, UNet2DConditionModel)  # Module.compile: no wrapper around the model
    assert model._compiled_call_impl is not None  # torch's compiled forward, built on the first call
    assert unet()._compiled_call_impl is None


def test_runtime_is_not_part_of_the_identity_and_auto_dtype_is_float32_on_a_cpu():
    ref = ModelRef(source="preset:tiny", subfolder="unet")
    fast = ref.model_copy(update={"runtime": Runtime(channels_last=True, compile=True)})
    assert fast.identity_key() == ref.identity_key()
    auto = ModelRef(source="preset:tiny", subfolder="unet", dtype="auto")
    assert auto.identity_key() != ref.identity_key() and "auto" in auto.identity_key()
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert unet_dtype(auto) == torch.float32


def unet_dtype(ref: ModelRef) -> torch.dtype:
    from diffusers import UNet2DConditionModel

    return load_component(ref, UNet2DConditionModel, device="cpu").dtype
