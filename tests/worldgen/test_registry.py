"""Registries: block types (lookup with suggestions, typed configs, plugins through the entry-point group) and
executors (by name, from run() and configs, plugins listed without loading them)."""

from __future__ import annotations

import sys

import pytest

import worldgen as wg
from worldgen.registry import (
    ENTRY_POINT_GROUP,
    EXECUTOR_GROUP,
    check_executor,
    executor_names,
    load_plugins,
    register_executor,
)


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


def install_plugin(tmp_path, monkeypatch, module: str, source: str, group: str, entry: str) -> None:
    """A package on sys.path as pip would leave it: the module and a dist-info declaring `entry` in `group`."""
    (tmp_path / f"{module}.py").write_text(source)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_plugin_blocks_register_through_entry_points(tmp_path, monkeypatch):
    source = (
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
    install_plugin(
        tmp_path, monkeypatch, "wg_plugin_demo", source, ENTRY_POINT_GROUP, "shout = wg_plugin_demo"
    )
    assert "shout" in load_plugins()
    g = wg.Graph("plugin")
    g.add_node("text/shout", id="s")
    g.expose_input("text", "s.text")
    g.expose_output("text", "s.text")
    assert g.run({"text": "hello"}) == {"text": "HELLO!"}
    sys.modules.pop("wg_plugin_demo", None)


# ---- executors ---------------------------------------------------------------------------------------
def doubled_graph(executor: str = "local") -> wg.Graph:
    g = wg.Graph("echo", executor=executor)
    g.add_node("toy/scale", id="s", config={"factor": 2.0})
    g.expose_input("x", "s.x")
    g.expose_output("y", "s.y")
    return g


def test_a_registered_executor_runs_engines_by_name_from_run_and_from_configs():
    import tests.toy_blocks  # noqa: F401 - registers toy/scale
    from worldgen.execution import run_local

    calls = []

    def recording(engine, inputs=None, options=None):
        calls.append((engine.name, options.seed))
        return run_local(engine, inputs, options)

    register_executor("recording", recording)
    assert "recording" in executor_names()
    assert doubled_graph().run({"x": 1.5}, executor="recording") == {"y": 3.0}
    config = doubled_graph().to_config() | {"executor": "recording"}
    assert wg.Graph.from_config(config).run({"x": 2.0}) == {"y": 4.0}  # the config's executor
    assert calls == [("echo", None)] * 2


def test_an_executor_plugin_is_listed_without_loading_it_and_loaded_on_first_use(tmp_path, monkeypatch):
    import tests.toy_blocks  # noqa: F401 - registers toy/scale

    source = (
        "from worldgen.execution import run_local\n"
        "def run(engine, inputs=None, options=None):\n"
        "    return {k: v * 10 for k, v in run_local(engine, inputs, options).items()}\n"
    )
    install_plugin(
        tmp_path, monkeypatch, "wg_executor_demo", source, EXECUTOR_GROUP, "times_ten = wg_executor_demo:run"
    )
    assert check_executor("times_ten") == "times_ten"
    graph = doubled_graph(executor="times_ten")  # a config may name it before it is loaded
    assert "wg_executor_demo" not in sys.modules
    assert graph.run({"x": 1.0}) == {"y": 20.0}  # 1 * 2 by the graph, * 10 by the plugin: the plugin ran
    assert "wg_executor_demo" in sys.modules
    sys.modules.pop("wg_executor_demo", None)


def test_unknown_executor_says_which_exist_and_suggests_the_closest():
    with pytest.raises(wg.GraphError, match=r"unknown executor 'locl' \(did you mean 'local'\?\)"):
        doubled_graph().run({"x": 1.0}, executor="locl")
    with pytest.raises(wg.GraphError, match=EXECUTOR_GROUP):
        wg.Graph("g", executor="nowhere")


def test_executor_names_come_without_importing_ray():
    """The core checks `executor: ray` in a config from the entry points alone: Ray is imported only to run."""
    import subprocess

    code = (
        "import sys\nimport worldgen\nfrom worldgen.registry import check_executor, executor_names\n"
        "assert {'local', 'ray'} <= set(executor_names()), executor_names()\ncheck_executor('ray')\n"
        "assert 'ray' not in sys.modules and 'actors' not in sys.modules, 'ray imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
