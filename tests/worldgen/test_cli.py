"""The `worldgen` command (validate, show, templates, run) and the renderers behind `show`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import worldgen as wg
from worldgen.cli import main
from worldgen.render import to_dot, to_json, to_mermaid

LOOP = ["unet", "cfg", "solver"]
FEEDBACK = {
    "solver.model_input -> unet.sample",
    "solver.timestep -> unet.timestep",
    "solver.latent -> solver.latent",
    "solver.state -> solver.state",
}


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return wg.Graph.from_template("text_to_image", preset="tiny", steps=2).to_config()


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def graph_file(tmp_path, tiny_config) -> Path:
    return _write(tmp_path / "t2i.yaml", tiny_config)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith("worldgen: error: "), captured.err
    assert "\n\n" not in captured.err.strip()
    return captured.err


# ---- validate -------------------------------------------------------------------------------------------------
def test_validate_ok(graph_file, capsys):
    assert main(["validate", str(graph_file)]) == 0
    assert capsys.readouterr().out.strip() == "ok: graph 'text_to_image' (10 nodes, 18 edges, 1 loop)"


def test_validate_saved_graph_directory_reads_only_the_config(tmp_path, tiny_config, capsys):
    _write(tmp_path / "graph.yaml", tiny_config)  # no checkpoint needed: validate loads no weights
    assert main(["validate", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: graph 'text_to_image'")


def test_validate_template(capsys):
    assert main(["validate", "template:text_to_image"]) == 0
    assert "ok: graph 'text_to_image'" in capsys.readouterr().out


def test_validate_reports_problems_with_exit_1(tmp_path, tiny_config, capsys):
    config = dict(tiny_config, inputs={k: v for k, v in tiny_config["inputs"].items() if k != "prompt"})
    assert main(["validate", str(_write(tmp_path / "g.yaml", config))]) == 1
    out = capsys.readouterr().out
    assert "1 problem" in out and "tok.text" in out and "required input has no source" in out


def _misspelt_port(config: dict) -> dict:
    return dict(config, edges=["tok.token_idz -> te.token_ids", *config["edges"][1:]])


def _unknown_type(config: dict) -> dict:
    return dict(config, nodes={**config["nodes"], "cfg": {"type": "guidance/cgf"}})


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_misspelt_port, ["at edges[0]", "token_idz", "did you mean 'token_ids'"]),
        (_unknown_type, ["at nodes.cfg.type", "guidance/cgf", "did you mean 'guidance/cfg'"]),
    ],
    ids=["misspelt-port", "unknown-block-type"],
)
def test_validate_bad_config_is_one_clear_error(tmp_path, tiny_config, capsys, edit, expected):
    path = _write(tmp_path / "bad.yaml", edit(tiny_config))
    assert main(["validate", str(path)]) == 2
    err = _error_line(capsys)
    assert str(path) in err
    for text in expected:
        assert text in err
    assert len(err.strip().splitlines()) == 1


def test_validate_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nnodes:\n  a: [1, 2\n  b: 3\n")
    assert main(["validate", str(path)]) == 2
    err = _error_line(capsys)
    assert str(path) in err and "line 4" in err and "malformed YAML" in err


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file or directory" in _error_line(capsys)


def test_debug_reraises(tmp_path, tiny_config):
    path = _write(tmp_path / "bad.yaml", _unknown_type(tiny_config))
    with pytest.raises(wg.ConfigError):
        main(["--debug", "validate", str(path)])
    with pytest.raises(wg.ConfigError):
        main(["validate", str(path), "--debug"])


def test_console_script_entry_point(tmp_path):
    script = Path(sys.executable).with_name("worldgen")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"worldgen {wg.__version__}"
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: {a: [\n")
    result = subprocess.run(
        [str(script), "validate", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.startswith("worldgen: error: ") and "Traceback" not in result.stderr


def test_import_is_light():
    code = (
        "import sys, worldgen.cli; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "[]"


# ---- show -----------------------------------------------------------------------------------------------------
def test_show_mermaid(graph_file, capsys):
    assert main(["show", str(graph_file), "--format", "mermaid"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("flowchart")
    assert text.count("-.->") == len(FEEDBACK)
    assert '-.->|"feedback: latent → latent"| node_solver' in text
    assert 'subgraph loop_unet_cfg_solver["loop: unet → cfg → solver"]' in text
    assert 'node_unet["unet<br/>backbone/unet2d"]' in text
    assert 'in_prompt(["input: prompt<br/>(text)"])' in text and "out_image" in text
    assert '-->|"token_ids → token_ids"|' in text
    assert "(same block as schedule)" in text  # solver shares the schedule's block


def test_show_dot(graph_file, capsys):
    assert main(["show", str(graph_file), "--format", "dot"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("digraph ")
    assert text.count("{") == text.count("}") and text.rstrip().endswith("}")
    assert "subgraph cluster_loop_unet_cfg_solver {" in text
    assert text.count("style=dashed") == len(FEEDBACK)
    assert 'label="feedback: state → state"' in text


def test_show_json(graph_file, capsys):
    assert main(["show", str(graph_file), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "text_to_image" and data["level"] == "graph"
    assert data["loops"][0]["nodes"] == LOOP and set(data["loops"][0]["feedback"]) == FEEDBACK
    assert {f"{e['from']} -> {e['to']}" for e in data["edges"] if e["feedback"]} == FEEDBACK
    assert not any(e["declared_feedback"] for e in data["edges"])  # all four are inferred by loops()
    unet = next(n for n in data["nodes"] if n["id"] == "unet")
    assert unet["type"] == "backbone/unet2d" and unet["inputs"]["sample"]["kind"] == "latent"
    assert data["inputs"]["prompt"] == {"kind": "text", "to": ["tok.text"]}
    assert data["outputs"]["image"] == {"kind": "image", "from": "vae.image"}
    assert data["valid"] is True and data["problems"] == []


def test_show_template_to_file(tmp_path, capsys):
    out = tmp_path / "t2i.mmd"
    assert main(["show", "template:text_to_image", "--format", "mermaid", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_text().startswith("flowchart")


def test_show_unknown_template(capsys):
    assert main(["show", "template:text_to_imag"]) == 2
    assert "did you mean 'text_to_image'" in _error_line(capsys)


# a world: the cycle in order, each stage a cluster holding its graphs (and pipelines, holding theirs)
CYCLE = ["philosopher", "author", "world_update", "development", "architect", "creator"]
TITLES = ["1. Philosopher", "2. Author", "3. World update", "4. Development", "5. Architect", "6. Creator"]


@pytest.fixture(scope="module")
def world_sources(tmp_path_factory) -> dict[str, Path]:
    """The default world with a Creator of two pipelines, one a pipeline of two graphs: as a config file, and
    as the directory of a world made from it."""
    from worldgen.cli import DEFAULT_WORLD
    from worldgen.config import load_config_file

    config = load_config_file(DEFAULT_WORLD)
    config["stages"]["creator"] = {
        "pipelines": {
            "text_to_image": {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}},
            "refined": {"template": "generate_and_refine", "params": {"preset": "tiny", "steps": 2}},
        }
    }
    root = tmp_path_factory.mktemp("show_world")
    file = _write(root / "world.yaml", config)
    wg.World.from_config(file, directory=root / "made")
    return {"file": file, "directory": root / "made"}


def _show(source: Path, fmt: str, capsys) -> str:
    assert main(["show", str(source), "--format", fmt]) == 0
    return capsys.readouterr().out


def _dot_clusters(text: str) -> dict[str, tuple[str | None, str]]:
    """cluster name -> (the cluster it sits in, its label), from the braces of a DOT text."""
    import re

    clusters, stack = {}, []
    for line in text.splitlines():
        opened = re.match(r"\s*subgraph (cluster_\w+) \{$", line)
        if opened:
            clusters[opened.group(1)] = (stack[-1] if stack else None, "")
            stack.append(opened.group(1))
        elif line.strip() == "}" and stack:
            stack.pop()
        elif stack and line.strip().startswith("label=") and not clusters[stack[-1]][1]:
            clusters[stack[-1]] = (clusters[stack[-1]][0], line.strip()[len("label=") : -1])
    return clusters


@pytest.mark.parametrize("source", ["file", "directory"])
def test_show_world_dot(world_sources, source, capsys):
    text = _show(world_sources[source], "dot", capsys)
    assert text.startswith('digraph "harbor" {') and "compound=true;" in text
    assert text.count("{") == text.count("}")
    clusters = _dot_clusters(text)
    stages = [c for c, (parent, _) in clusters.items() if parent is None]
    assert stages == [f"cluster_stage_{role}" for role in CYCLE]  # in cycle order
    for stage, title in zip(stages, TITLES, strict=True):
        assert clusters[stage][1].startswith(f'"{title}\\n')
    assert (
        clusters["cluster_stage_philosopher"][1] == '"1. Philosopher\\nreads blocks 1, 2, 3; writes block 4"'
    )
    graphs = {c: parent for c, (parent, label) in clusters.items() if "graph '" in label}
    assert graphs == {
        "cluster_philosopher__main": "cluster_stage_philosopher",
        "cluster_author__main": "cluster_stage_author",
        "cluster_world_update__main": "cluster_stage_world_update",
        "cluster_development__main": "cluster_stage_development",
        "cluster_architect__main": "cluster_stage_architect",
        "cluster_creator__text_to_image": "cluster_stage_creator",
        "cluster_creator__refined__generate": "cluster_creator__refined",  # a pipeline's graphs sit in it
        "cluster_creator__refined__refine": "cluster_creator__refined",
    }
    assert clusters["cluster_creator__refined"] == (
        "cluster_stage_creator",
        "\"refined: pipeline 'generate_and_refine'\"",
    )
    # the loop of each diffusion graph is a cluster inside its graph's
    assert (
        clusters["cluster_creator__refined__refine__loop_unet_cfg_solver"][0]
        == "cluster_creator__refined__refine"
    )
    cycle = re.findall(r"(cluster_stage_\w+)_anchor -> (cluster_stage_\w+)_anchor \[label=\"([^\"]+)\"", text)
    expected = [
        (f"cluster_stage_{a}", f"cluster_stage_{b}")
        for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1], strict=True)
    ]
    assert [(a, b) for a, b, _ in cycle] == expected
    assert [label for *_, label in cycle] == ["then"] * 5 + ["next step"]
    assert (
        'cluster_creator__refined__generate_anchor -> cluster_creator__refined__refine_anchor [label="image → image"'
        in text
    )
    assert "creator__text_to_image__node_unet [" in text and "philosopher__main__node_describe [" in text


@pytest.mark.parametrize("source", ["file", "directory"])
def test_show_world_mermaid(world_sources, source, capsys):
    text = _show(world_sources[source], "mermaid", capsys)
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    opened = [line.strip() for line in lines if line.lstrip().startswith("subgraph ")]
    assert sum(line.strip() == "end" for line in lines) == len(opened)
    top = [line for line in lines if line.startswith("  subgraph ")]  # the stages, nothing nested
    assert [line.split("<br/>")[0] for line in top] == [
        f'  subgraph stage_{role}["{title}' for role, title in zip(CYCLE, TITLES, strict=True)
    ]
    assert top[-1] == '  subgraph stage_creator["6. Creator<br/>reads block 2; writes block 3"]'
    assert "    subgraph philosopher__main[\"main: graph 'philosopher'\"]" in lines
    assert "    subgraph creator__refined[\"refined: pipeline 'generate_and_refine'\"]" in lines
    assert "      subgraph creator__refined__refine[\"refine: graph 'image_to_image'\"]" in lines
    assert '      creator__refined__generate -->|"image → image"| creator__refined__refine' in lines
    cycle = [line.strip() for line in lines if line.startswith("  stage_")]
    arrows = ["==>"] * 5 + ["-.->"]
    labels = ["then"] * 5 + ["next step"]
    assert cycle == [
        f'stage_{a} {arrow}|"{label}"| stage_{b}'
        for a, b, arrow, label in zip(CYCLE, CYCLE[1:] + CYCLE[:1], arrows, labels, strict=True)
    ]
    assert '      philosopher__main__node_describe["describe<br/>vlm/image_stats"]' in lines


@pytest.mark.parametrize("source", ["file", "directory"])
def test_show_world_json(world_sources, source, capsys):
    data = json.loads(_show(world_sources[source], "json", capsys))
    assert data["name"] == "harbor" and data["level"] == "world" and data["cycle"] == CYCLE
    assert [s["role"] for s in data["stages"]] == CYCLE and [s["title"] for s in data["stages"]] == TITLES
    assert [(e["from"], e["to"], e["next_step"]) for e in data["edges"]] == [
        (a, b, b == "philosopher") for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1], strict=True)
    ]
    philosopher = data["stages"][0]
    assert philosopher["level"] == "stage" and (philosopher["reads"], philosopher["writes"]) == ([1, 2, 3], 4)
    graph = philosopher["nodes"][0]["contents"]
    assert graph["level"] == "graph" and [n["type"] for n in graph["nodes"]] == ["vlm/image_stats"]
    creator = {n["id"]: n["contents"] for n in data["stages"][-1]["nodes"]}
    assert set(creator) == {"text_to_image", "refined"}
    assert creator["text_to_image"]["loops"][0]["nodes"] == LOOP
    refined = creator["refined"]
    assert refined["level"] == "pipeline" and [n["id"] for n in refined["nodes"]] == ["generate", "refine"]
    assert [n["contents"]["name"] for n in refined["nodes"]] == ["text_to_image", "image_to_image"]
    assert "contents" not in creator["text_to_image"]["nodes"][0]  # a block has no contents


def test_renderers_escape_awkward_node_ids():
    g = wg.Graph('odd "name" {x}')
    g.add_node("guidance/cfg", id='end "a" <b>', auto_connect=False)
    g.add_node("guidance/cfg", id="x y#1", auto_connect=False)
    g.add_edge('end "a" <b>.pred', "x y#1.pred_cond")
    g.add_edge("x y#1.pred", "x y#1.pred_uncond")  # a self loop: its edge is a feedback edge
    g.expose_input("p", ['end "a" <b>.pred_cond', 'end "a" <b>.pred_uncond'])
    g.expose_output("out", "x y#1.pred")
    mermaid = to_mermaid(g)
    for line in mermaid.splitlines()[2:]:
        head = line.strip().split("[", 1)[0].split("(", 1)[0].split(" ", 1)[0]
        assert head.replace("_", "").isalnum() or head in {"subgraph", "end", "classDef"}, line
    assert "#quot;a#quot; #lt;b#gt;" in mermaid
    dot = to_dot(g)
    assert dot.startswith('digraph "odd \\"name\\" {x}" {')
    assert 'label="end \\"a\\" <b>\\nguidance/cfg"' in dot
    data = json.loads(json.dumps(to_json(g)))
    assert [n["id"] for n in data["nodes"]] == ['end "a" <b>', "x y#1"]
    assert data["loops"][0]["nodes"] == ["x y#1"]


# ---- templates --------------------------------------------------------------------------------------------------
def test_templates_listing(capsys):
    assert main(["templates"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"text_to_image", "image_to_image"} <= set(names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every template has a description


# ---- run --------------------------------------------------------------------------------------------------------
def test_run_writes_png_and_diagram(tmp_path, capsys):
    from PIL import Image

    code = main(
        ["generate", "--preset", "tiny", "--steps", "2", "--prompt", "a red boat", "--out", str(tmp_path)]
    )
    assert code == 0
    captured = capsys.readouterr()
    png = Path(captured.out.strip())
    assert png == tmp_path / "text_to_image_seed0.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    assert (tmp_path / "graph.mmd").read_text().startswith("flowchart")
    assert "running graph 'text_to_image'" in captured.err


@pytest.fixture
def media_file(tmp_path) -> Path:
    """A toy graph giving a batch of two clips, a sound and the sound's sample rate."""
    import tests.toy_blocks  # noqa: F401 - registers the toy blocks

    g = wg.Graph("moving")
    g.add_node("toy/clip", id="clip")
    g.add_node("toy/tone", id="tone")
    g.expose_input("frames", "clip.frames", default=5)
    g.expose_input("batch_size", "clip.batch_size", default=2)
    g.expose_output("video", "clip.video")
    g.expose_output("audio", "tone.audio")
    g.expose_output("sample_rate", "tone.sample_rate")
    return _write(tmp_path / "moving.yaml", g.to_config())


def test_run_writes_videos_with_previews_and_sounds(media_file, tmp_path, capsys):
    from PIL import Image

    from worldgen.media import probe

    out = tmp_path / "out"
    assert main(["generate", str(media_file), "--fps", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["moving_video_seed0_0.mp4", "moving_video_seed0_0.preview.webp", "moving_video_seed0_1.mp4"]
    names += ["moving_video_seed0_1.preview.webp", "moving_audio_seed0.wav"]
    assert printed == [str(out / name) for name in names]
    clip = probe(out / "moving_video_seed0_1.mp4")
    assert (clip.frames, clip.fps, clip.width, clip.height) == (5, 10, 24, 16)
    with Image.open(out / "moving_video_seed0_0.preview.webp") as preview:
        assert preview.is_animated and preview.n_frames == 5
    sound = probe(out / "moving_audio_seed0.wav")
    assert (sound.sample_rate, sound.channels, sound.duration) == (8000, 2, 0.25)  # the graph's own rate

    other = tmp_path / "other"
    args = [
        "generate",
        str(media_file),
        "-i",
        "batch_size=1",
        "--video-format",
        "webm",
        "--audio-format",
        "flac",
    ]
    assert main([*args, "--out", str(other)]) == 0
    assert capsys.readouterr().out.split() == [
        str(other / name)
        for name in ("moving_video_seed0.webm", "moving_video_seed0.preview.webp", "moving_audio_seed0.flac")
    ]
    assert probe(other / "moving_video_seed0.webm").frames == 5


@pytest.mark.parametrize("fps", ["0", "-3", "500", "fast"])
def test_run_refuses_a_bad_fps_before_the_graph_runs(media_file, tmp_path, capsys, fps):
    assert main(["generate", str(media_file), "--fps", fps, "--out", str(tmp_path / "out")]) == 2
    assert "argument --fps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_rejects_preset_with_file(graph_file, tmp_path, capsys):
    assert main(["generate", str(graph_file), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "--preset applies only to a template" in _error_line(capsys)
    assert not any(tmp_path.glob("*.png"))


def test_images_save_png_batch(tmp_path):
    import torch
    from PIL import Image

    from worldgen.images import save_png, to_pil

    batch = torch.rand(2, 3, 8, 12)
    paths = save_png(batch, tmp_path / "sub", "img")
    assert [p.name for p in paths] == ["img_0.png", "img_1.png"]
    with Image.open(paths[1]) as image:
        assert image.size == (12, 8)
    assert to_pil(batch[0])[0].size == (12, 8)
    assert not list((tmp_path / "sub").glob(".*.tmp"))


# ---- check ----------------------------------------------------------------------------------------------------
def test_check_lists_damage_and_repair_rebuilds_what_is_derivable(tmp_path, capsys):
    from tests.worldgen.test_storage import CONFIG, saved_episodes
    from worldgen.storage import WorldStorage

    store = WorldStorage(tmp_path / "w")
    store.create(CONFIG)
    saved_episodes(store, 3)
    assert main(["check", str(store.root)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {store.root} (3 episodes)"

    store.index_path.unlink()
    state = store.episode_dir(2) / "state.json"
    kept = state.read_bytes()
    state.unlink()
    assert main(["check", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert "  - episode 2: episodes/000002/state.json is missing (cannot be rebuilt" in out
    assert "  - episodes/index.jsonl is out of step with the episode folders (--repair rebuilds it)" in out
    assert not store.index_path.exists()  # check alone writes nothing

    assert main(["check", "--repair", str(store.root)]) == 1  # the index is rebuilt, state.json cannot be
    out = capsys.readouterr().out
    assert "repaired: episodes/index.jsonl is out of step" in out and "1 problem(s)" in out
    assert store.index_path.exists() and store.episodes() == [1, 2, 3]

    state.write_bytes(kept)  # restored from a backup
    assert main(["check", "--repair", str(store.root)]) == 0
    assert (store.root / "report.html").exists()
    assert main(["check", str(tmp_path)]) == 2
    assert "no world at" in _error_line(capsys)
