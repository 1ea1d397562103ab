"""The role contracts (worldgen/stage.py): the canon of DESIGN.md §2.3 written as data, and the stage reading it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from worldgen.errors import GraphError
from worldgen.stage import CONTRACTS, CYCLE, REFERENCE_INPUTS, Schema, Stage, reference_input, role_that
from worldgen.state import WorldState

# DESIGN.md §2.3, restated here on purpose (not derived from CONTRACTS), so a changed contract fails below.
CANON_CYCLE = ("philosopher", "author", "world_update", "development", "architect", "creator")
CANON_NEEDS = {  # "Philosopher needs 1-3, Author needs 1-4, World update needs 1-5, Architect needs 1, Creator 2"
    "philosopher": {1, 2, 3},
    "author": {1, 2, 3, 4},
    "world_update": {1, 2, 3, 4, 5},
    "development": set(),
    "architect": {1},
    "creator": {2},
}
CANON_WRITES = {
    "development": 1,
    "architect": 2,
    "creator": 3,
    "philosopher": 4,
    "author": 5,
    "world_update": None,
}
# (output port, what it holds): text blocks; block 2 validated as GenerationConfig; block 3 images
CANON_OUTPUT = {
    "philosopher": ("text", Schema.TEXT),
    "author": ("text", Schema.TEXT),
    "world_update": ("text", Schema.TEXT),  # the world's new story
    "development": ("text", Schema.TEXT),
    "architect": ("data", Schema.GENERATION_CONFIG),
    "creator": ("image", Schema.ARTIFACTS),
}
# the one role with each behaviour: Development always runs, takes the user's Action and starts a new state;
# the Creator runs the pipeline block 2 names; World update saves the complete state as an episode
CANON_ONLY = {
    "always_runs": "development",
    "receives_action": "development",
    "starts_state": "development",
    "selects_pipeline": "creator",
    "feeds_references": "creator",  # block 2's references: earlier images fed to the pipeline it runs
    "saves_episode": "world_update",
}
# every role is trained from episodes but World update; the Philosopher also as a captioner
CANON_TRAINED = {
    "philosopher": {"chat", "caption"},
    "author": {"chat"},
    "world_update": set(),
    "development": {"chat"},
    "architect": {"chat"},
    "creator": {"denoising"},
}


def test_contracts_are_the_canon():
    assert CYCLE == CANON_CYCLE
    assert set(CONTRACTS) == set(CANON_CYCLE)
    for role, contract in CONTRACTS.items():
        assert contract.reads == CANON_NEEDS[role], role
        assert contract.writes == CANON_WRITES[role], role
        assert (contract.output, contract.output_schema) == CANON_OUTPUT[role], role
        assert contract.trained_as == CANON_TRAINED[role], role
        for field, only in CANON_ONLY.items():
            assert getattr(contract, field) is (role == only), f"{role}.{field}"


def test_a_role_sees_the_blocks_written_before_its_own():
    # a state fills in block order: the Creator runs on blocks 1-2 although it needs only block 2
    assert {r: set(c.sees) for r, c in CONTRACTS.items()} == {
        "philosopher": {1, 2, 3},
        "author": {1, 2, 3, 4},
        "world_update": {1, 2, 3, 4, 5},
        "development": set(),
        "architect": {1},
        "creator": {1, 2},
    }


def test_role_that_finds_a_role_by_what_it_does(monkeypatch):
    assert role_that(lambda c: c.selects_pipeline) == "creator"
    assert role_that(lambda c: c.saves_episode) == "world_update"
    with pytest.raises(GraphError, match=r"exactly one role.*\['philosopher', 'author'"):
        role_that(lambda c: c.writes in (4, 5))
    monkeypatch.setitem(CONTRACTS, "creator", replace(CONTRACTS["creator"], selects_pipeline=False))
    with pytest.raises(GraphError, match="found none"):
        role_that(lambda c: c.selects_pipeline)


# the canon's execution rule, by the blocks a state holds: which roles run
RULE = [
    (set(), {"development"}),
    ({1}, {"development", "architect"}),
    ({1, 2}, {"development", "creator"}),
    ({1, 2, 3}, {"development", "philosopher"}),
    ({1, 2, 3, 4}, {"development", "author"}),
    ({1, 2, 3, 4, 5}, {"development", "world_update"}),
]
FULL = {
    1: "a ship",
    2: {"pipeline": "p", "prompt": "a ship"},
    3: ["a.png"],
    4: "red",
    5: "a kite",
}


@pytest.mark.parametrize(("filled", "running"), RULE, ids=[str(sorted(f)) for f, _ in RULE])
def test_should_run_is_the_execution_rule(filled, running):
    state = WorldState.from_blocks({n: FULL[n] for n in filled})
    assert {role for role in CYCLE if Stage(role).should_run(state)} == running


def test_should_run_follows_always_runs(monkeypatch):
    started = WorldState.from_blocks({1: "a ship"})
    assert Stage("development").should_run(started)  # always runs, although its block is filled
    monkeypatch.setitem(CONTRACTS, "development", replace(CONTRACTS["development"], always_runs=False))
    assert not Stage("development").should_run(started)
    monkeypatch.setitem(CONTRACTS, "author", replace(CONTRACTS["author"], always_runs=True))
    assert Stage("author").should_run(WorldState())


def test_selects_follows_the_contract(monkeypatch):
    assert Stage("creator").selects and not Stage("architect").selects
    monkeypatch.setitem(CONTRACTS, "creator", replace(CONTRACTS["creator"], selects_pipeline=False))
    assert not Stage("creator").selects


def test_controls_are_the_reference_inputs_a_pipeline_exposes():
    """A pipeline takes a control when it exposes the control's image input (the names the adapter templates
    expose); the Architect is shown these."""
    import tests.toy_blocks  # noqa: F401  (registers the toy blocks)
    from worldgen.graph import Graph

    assert {c: (i, s) for c, (i, s, _) in REFERENCE_INPUTS.items()} == {
        "controlnet": ("control_image", "controlnet_scale"),
        "ip_adapter": ("ip_adapter_image", "ip_adapter_scale"),
        "img2img": ("image", "strength"),
    }
    assert [reference_input("control_image", k) for k in (1, 2, 3)] == [
        "control_image",
        "control_image_2",
        "control_image_3",
    ]
    creator = Stage("creator")
    for name, inputs in {
        "plain": [],
        "both": ["control_image", "ip_adapter_image"],
        "i2i": ["image"],
    }.items():
        g = Graph(name)
        g.add_node("toy/add", id="n")
        g.expose_input("prompt", "n.a")
        for port in inputs:
            g.expose_input(port, "n.b", default=None)
        creator.add_pipeline(g, id=name)
    assert creator.controls() == {"plain": [], "both": ["controlnet", "ip_adapter"], "i2i": ["img2img"]}
