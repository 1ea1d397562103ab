"""Loading components (worldgen/models/loading.py): save/load round trips, dtypes, scheduler classes, errors that
name what is missing, never the hub for a local directory, architectures round-tripped."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from worldgen.block import ModelRef
from worldgen.errors import ModelLoadError
from worldgen.models import build_preset_component, load_component, save_preset_pipeline
from worldgen.models.loading import build_from_architecture, dtype_from_name, save_architecture


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_preset_pipeline("tiny", tmp_path_factory.mktemp("sd") / "tiny")


def test_save_then_load_gives_equal_weights(tiny_dir):
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        loaded = load_component(ModelRef(source=str(tiny_dir), subfolder=sub), cls)
        assert isinstance(loaded, cls) and not loaded.training
        assert_same_weights(build_preset_component("tiny", sub), loaded)
    tok = load_component(ModelRef(source=str(tiny_dir), subfolder="tokenizer"), CLIPTokenizer)
    assert tok("a photo").input_ids == build_preset_component("tiny", "tokenizer")("a photo").input_ids


def test_dtype_cast(tiny_dir):
    vae = load_component(ModelRef(source=str(tiny_dir), subfolder="vae", dtype="bf16"), AutoencoderKL)
    assert vae.dtype == torch.bfloat16
    te = load_component(
        ModelRef(source="preset:tiny", subfolder="text_encoder", dtype="float16"), CLIPTextModel
    )
    assert te.dtype == torch.float16


def test_scheduler_class_switching(tiny_dir):
    for source in (str(tiny_dir), "preset:tiny"):
        sched = load_component(ModelRef(source=source, subfolder="scheduler"), EulerDiscreteScheduler)
        assert isinstance(sched, EulerDiscreteScheduler)
        assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012


def test_missing_subfolder_names_it(tiny_dir):
    with pytest.raises(ModelLoadError, match=r"no subfolder 'transformer'.*found: .*unet") as info:
        load_component(ModelRef(source=str(tiny_dir), subfolder="transformer"), UNet2DConditionModel)
    assert str(tiny_dir) in str(info.value)


def test_wrong_class_or_variant_for_directory_is_model_load_error(tiny_dir):
    with pytest.raises(
        ModelLoadError, match=r"tokenizer' has no config.json, so it holds no UNet2DConditionModel"
    ):
        load_component(ModelRef(source=str(tiny_dir), subfolder="tokenizer"), UNet2DConditionModel)
    with pytest.raises(ModelLoadError, match="subfolder 'text_encoder' as CLIPTextModel") as info:
        load_component(
            ModelRef(source=str(tiny_dir), subfolder="text_encoder", variant="fp16"), CLIPTextModel
        )
    assert info.value.__cause__ is not None  # the library's own error stays reachable


def test_missing_directory_does_not_go_to_the_hub(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=f"directory '{missing}' does not exist"):
        load_component(ModelRef(source=str(missing), subfolder="scheduler"), EulerDiscreteScheduler)


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_component(ModelRef(source="preset:tiny", subfolder="vae", dtype="float8"), AutoencoderKL)
    assert dtype_from_name("fp16") is torch.float16 and dtype_from_name("bfloat16") is torch.bfloat16


def _public_config(obj) -> dict:
    config = obj.config.to_dict() if hasattr(obj.config, "to_dict") else dict(obj.config)
    return {
        k: v for k, v in config.items() if not k.startswith("_")
    }  # `_use_default_values` etc. are bookkeeping


@pytest.mark.parametrize("sub", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_architecture_round_trip(tmp_path, sub):
    original = build_preset_component("tiny", sub)
    save_architecture(original, tmp_path)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    rebuilt = build_from_architecture(type(original), tmp_path)
    assert type(rebuilt) is type(original)
    if sub == "tokenizer":
        assert rebuilt("a cat at dawn").input_ids == original("a cat at dawn").input_ids
        return
    assert _public_config(rebuilt) == _public_config(original)
    if sub == "scheduler":
        return
    rebuilt.load_state_dict(original.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        if sub == "unet":
            args = (torch.randn(1, 4, 16, 16), torch.tensor([10]))
            kwargs = {"encoder_hidden_states": torch.randn(1, 77, 32)}
            a, b = original(*args, **kwargs).sample, rebuilt(*args, **kwargs).sample
        elif sub == "vae":
            z = torch.randn(1, 4, 16, 16)
            a, b = original.decode(z).sample, rebuilt.decode(z).sample
        else:
            ids = torch.tensor([[651, 300, 400, 652]])
            a, b = original(ids).last_hidden_state, rebuilt(ids).last_hidden_state
    assert torch.equal(a, b)
