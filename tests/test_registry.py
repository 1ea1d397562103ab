"""Block registry: lookup with suggestions, typed configs, and plugins through the entry-point group."""

from __future__ import annotations

import sys

import pytest

import worldgen as wg
from worldgen.registry import ENTRY_POINT_GROUP, load_plugins


def test_builtin_block_types_are_registered():
    types = wg.block_types()
    for expected in [
        "tokenizer/clip",
        "conditioner/clip_text",
        "backbone/unet2d",
        "guidance/cfg",
        "codec/vae",
        "latent/noise",
        "solver/ddim",
        "solver/euler",
        "solver/euler_ancestral",
        "solver/dpmpp_2m",
    ]:
        assert expected in types


def test_unknown_type_suggests_the_closest():
    with pytest.raises(wg.UnknownBlockTypeError, match=r"'solver/dim' \(did you mean 'solver/ddim'\?\)"):
        wg.create_block("solver/dim")


def test_typed_config_is_validated():
    block = wg.create_block("guidance/cfg", {"scale": 3})
    assert block.config.scale == 3.0
    with pytest.raises(wg.ConfigError, match="config.rescale: Input should be less than or equal to 1"):
        wg.create_block("guidance/cfg", {"rescale": 2})


def test_model_shorthand_uses_the_block_default_subfolder():
    block = wg.create_block("backbone/unet2d", {"model": "some/dir"})
    assert block.config.model == wg.ModelRef(source="some/dir", subfolder="unet")


def test_block_type_must_be_role_slash_impl():
    class Bad(wg.Block):
        block_type = "NoSlash"

    with pytest.raises(wg.WorldgenError, match="must look like 'role/impl'"):
        wg.register_block(Bad)


def test_plugin_blocks_register_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "wg_plugin_demo.py").write_text(
        "import worldgen as wg\n"
        "from worldgen.ports import Port, PortKind\n"
        "@wg.register_block\n"
        "class Shout(wg.Block):\n"
        "    block_type = 'text/shout'\n"
        "    INPUTS = (Port('text', PortKind.TEXT),)\n"
        "    OUTPUTS = (Port('text', PortKind.TEXT),)\n"
        "    def forward(self, text):\n"
        "        return {'text': text.upper() + '!'}\n"
    )
    dist = tmp_path / "wg_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wg-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nshout = wg_plugin_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "shout" in load_plugins()
    g = wg.Graph("plugin")
    g.add_node("text/shout", id="s")
    g.expose_input("text", "s.text")
    g.expose_output("text", "s.text")
    assert g.run({"text": "hello"}) == {"text": "HELLO!"}
    sys.modules.pop("wg_plugin_demo", None)
