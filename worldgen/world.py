"""World: the fixed cycle Philosopher → Author → Environment (World update, Development) → Architect → Creator
over one five-block state, with the world's content, storage after every stage, and resume.

    world = wg.World.from_config("configs/worlds/default.yaml", directory="worlds/harbor")
    report = world.step(action="a storm rolls in")   # one pass around the cycle
    report.ran, report.skipped, report.episode, report.state
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from worldgen import creation
from worldgen.config import SCHEMA_VERSION, check_schema, load_config_file, resolve_refs
from worldgen.errors import (
    ConfigError,
    ExecutionError,
    GraphError,
    StepInFlightError,
    WorldgenError,
    format_validation_error,
)
from worldgen.limits import LimitExceeded, Limits, applying, time_limit, within
from worldgen.media import read_media
from worldgen.plan import Problem
from worldgen.reference import reference_inputs
from worldgen.registry import build_world_template, check_executor
from worldgen.stage import CONTRACTS, CYCLE, KINDS, REFERENCE_INPUTS, Schema, Stage, build_item, role_that
from worldgen.state import (
    Fps,
    Frames,
    Generation,
    Guidance,
    ImageSide,
    Progress,
    Seconds,
    Steps,
    WorldContent,
    WorldState,
)
from worldgen.storage import WorldDamagedError, WorldStorage

log = logging.getLogger("worldgen.world")
_GENERATION: TypeAdapter[list] = TypeAdapter(Generation)  # block 2 as the Architect writes it


class InitialWorld(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = "Untitled world"
    story: str = ""
    glossary: dict[str, str] = Field(default_factory=dict)
    style: str = ""
    rules: list[str] = Field(default_factory=list)


class GenerationDefaults(BaseModel):
    """Generation settings offered to the Architect (its prompt shows them); validated as block 2 is, so a
    world never starts with defaults its Creator cannot run."""

    model_config = ConfigDict(extra="forbid")

    width: ImageSide = 512
    height: ImageSide = 512
    steps: Steps = 30
    guidance: Guidance = 7.5
    frames: Frames = Field(17, description="frames of a clip (video requests)")
    fps: Fps = Field(16.0, description="frames per second of a clip")
    duration: Seconds = Field(5.0, description="seconds of a sound (audio requests)")


class WorldSettings(BaseModel):
    """The world-level keys of a world config (the stages are built separately)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: str = "world"
    name: str = "world"
    seed: int = Field(0, ge=0)
    executor: str = "local"
    initial_world: InitialWorld = Field(default_factory=InitialWorld)
    generation_defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    prompts: str | None = Field(None, description="directory of prompt templates overriding configs/prompts/")
    stages: dict[str, Any]


@dataclass
class StepReport:
    """What one `World.step()` did: stage names in cycle order, the episode saved (if any), the state after."""

    step: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    episode: int | None = None
    state: WorldState = field(default_factory=WorldState)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ran": self.ran,
            "skipped": self.skipped,
            "episode": self.episode,
            "state": self.state.model_dump(mode="json"),
        }


StageCallback = Callable[[str, str, int], None]  # (role, "ran" | "skipped", step)


class World:
    """One world: settings, six stages, content, the in-flight state, and its directory.

    `limits` are a server's budgets (worldgen.limits): the generation settings it accepts (the config's
    defaults, the Architect's block 2, a user's block 2) and the wall time of one stage. None (the CLI, the
    Python API: the config's author runs it) means no budget.
    """

    def __init__(
        self,
        settings: WorldSettings,
        stages: dict[str, Stage],
        directory: str | Path,
        config: Mapping[str, Any],
        limits: Limits | None = None,
    ):
        self.settings = settings
        self.limits = limits
        self.stages = stages
        # as stored (`stored_config`): `${env:...}` stays a reference, so no secret is saved
        self.config = dict(config)
        self.storage = WorldStorage(directory)
        self.content = WorldContent(**settings.initial_world.model_dump())
        self.progress = Progress()
        self.callbacks: list[StageCallback] = []
        self.prompts_dir: Path | None = None
        self.created = False  # True when `from_config` created the world's directory (won its claim)

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | Path,
        directory: str | Path | None = None,
        *,
        limits: Limits | None = None,
    ) -> World:
        """Build a world from its YAML (or mapping); its directory defaults to `worlds/<name>`.

        A directory that already holds this world is continued where it stopped; one holding a different world
        is refused (nothing saved is ever overwritten).
        """
        config, file, base = _source(config)
        check_schema(config, "world", file=file)
        world = cls._build(config, file, base, directory, limits)
        # the atomic claim: of concurrent creates in one directory exactly one starts the world; a different
        # world there raises WorldExistsError
        if not world.storage.create(world.config):
            return cls.load(world.storage.location, limits=limits)
        world._start()
        world.created = True
        return world

    @classmethod
    def _build(
        cls,
        config: dict[str, Any],
        file: str | None,
        base: Path,
        directory: str | Path | None,
        limits: Limits | None = None,
    ) -> World:
        if "base" in config:
            return cls._build_custom(config, file, base, directory, limits)
        try:
            settings = WorldSettings.model_validate(config)
            check_executor(settings.executor)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err), file=file) from None
        except GraphError as err:
            raise ConfigError(str(err), file=file, path="executor") from None
        if limits is not None:  # before any stage is built (and any model loaded)
            defaults = settings.generation_defaults
            limits.check_generation(
                width=defaults.width,
                height=defaults.height,
                steps=defaults.steps,
                path="generation_defaults",
                file=file,
            )
            for field, value, limit in (
                ("frames", defaults.frames, "max_video_frames"),
                ("duration", defaults.duration, "max_audio_seconds"),
            ):
                if value > getattr(limits, limit):
                    raise LimitExceeded(
                        limit,
                        f"{field} {value:g} is over {getattr(limits, limit):g}",
                        path=f"generation_defaults.{field}",
                        file=file,
                    )
        prompts = None
        if settings.prompts:
            from worldgen.prompts import set_prompt_dirs

            # a world's own copy (see `_start`); for a world on a store, in its local cache
            local = WorldStorage(directory).root / "prompts" if directory is not None else None
            prompts = local if local is not None and local.is_dir() else (base / settings.prompts).resolve()
            set_prompt_dirs([prompts])
        missing = [role for role in CYCLE if role not in settings.stages]
        unknown = [role for role in settings.stages if role not in CYCLE]
        if missing or unknown:
            what = f"missing {missing}" if missing else f"unknown {unknown}"
            raise ConfigError(
                f"a world has exactly the stages {list(CYCLE)}; {what}", file=file, path="stages"
            )
        stages = {}
        for role in CYCLE:
            try:
                stages[role] = _build_stage(role, settings.stages[role])
            except ConfigError as err:
                raise ConfigError(
                    err.detail, file=file, path=f"stages.{role}" + (f".{err.path}" if err.path else "")
                ) from None
            except WorldgenError as err:
                raise ConfigError(str(err), file=file, path=f"stages.{role}") from None
        if directory is None:
            directory = Path("worlds") / settings.name
        world = cls(settings, stages, directory, config, limits)
        world.prompts_dir = prompts
        return world

    @classmethod
    def _build_custom(
        cls,
        config: dict[str, Any],
        file: str | None,
        base: Path,
        directory: str | Path | None,
        limits: Limits | None,
    ) -> World:
        """A custom (LoRA) world: `base:` a world directory or config file, `adapters:` the folder of its
        trained adapters (worldgen/lora.py); any other top-level key (name, seed, initial_world, ...) overrides
        the base config's. Paths are relative to the file that names them, and saved resolved."""
        from worldgen.lora import use_adapters

        reference, adapters = _custom_paths(config, base)
        base_file = WorldStorage(reference).config_path if reference.is_dir() else reference
        try:
            base_config = load_config_file(base_file)
        except ConfigError as err:
            raise ConfigError(f"the base world: {err}", file=file, path="base") from None
        if "base" in base_config:
            raise ConfigError(
                "the base world is itself a custom world: name its base", file=file, path="base"
            )
        overrides = {k: v for k, v in config.items() if k not in ("base", "adapters")}
        world = cls._build({**base_config, **overrides}, str(base_file), base_file.parent, directory, limits)
        try:
            use_adapters(world, adapters)
        except ConfigError as err:
            raise ConfigError(err.detail, file=err.file or file, path="adapters") from None
        world.config = {**config, "base": str(reference), "adapters": str(adapters)}
        return world

    @classmethod
    def from_template(
        cls, name: str, directory: str | Path | None = None, *, limits: Limits | None = None, **params: Any
    ) -> World:
        """A world from a registered world template (a function returning a world config)."""
        return cls.from_config(build_world_template(name, **params), directory, limits=limits)

    @classmethod
    def check(cls, config: Mapping[str, Any] | str | Path, *, limits: Limits | None = None) -> World:
        """Build a world from its config without creating or touching its directory (for validation)."""
        config, file, base = _source(config)
        check_schema(config, "world", file=file)
        return cls._build(config, file, base, None, limits)

    @classmethod
    def load(cls, directory: str | Path, *, limits: Limits | None = None) -> World:
        """Continue a world from its directory: config, content, in-flight state (and trained weights)."""
        from worldgen.checkpoint import load_weights

        storage = WorldStorage(directory)
        if not storage.exists():
            where = storage.uri or storage.root.resolve()
            raise ConfigError(
                f"no world here (no {storage.config_path.name} in {where})", file=str(directory)
            )
        damage = [d for d in storage.check() if not d.repairable]  # named here, not steps later
        if damage:
            raise WorldDamagedError(storage.location, damage)
        storage.fetch_tree(storage.root / "prompts")  # a world on a store: its own prompts, into the cache
        world = cls._build(storage.load_config(), str(storage.config_path), storage.root, directory, limits)
        world.content = storage.load_content() or world.content
        world.progress = storage.load_progress() or world.progress
        if storage.fetch_tree(storage.checkpoints_dir).exists():
            load_weights(world.named_blocks(), storage.checkpoints_dir)
        return world

    def _start(self) -> None:
        # The world's own prompts travel with it, so a reload (another process, a restarted driver) finds them.
        local = self.storage.root / "prompts"
        if (
            self.prompts_dir is not None
            and self.prompts_dir.is_dir()
            and self.prompts_dir.resolve() != local.resolve()
        ):
            shutil.copytree(self.prompts_dir, local, dirs_exist_ok=True)
            self.storage.publish_tree(local)
        self.storage.save_config(self.config)
        self.storage.save_content(self.content)
        self.storage.save_progress(self.progress)

    def save(self) -> Path:
        """Write everything, the stages' weights included (a trained world reloads with them)."""
        from worldgen.checkpoint import save_weights

        self._start()
        save_weights(self.named_blocks(), self.storage.checkpoints_dir)
        self.storage.publish_tree(self.storage.checkpoints_dir)
        self.write_report()
        return self.storage.root

    def named_blocks(self) -> list[tuple[str, Any]]:
        return [
            (f"{role}.{name}", block) for role in CYCLE for name, block in self.stages[role].named_blocks()
        ]

    def validate(self) -> list[Problem]:
        """Every problem in the stages (their graphs included) and in what they give the world."""
        problems = []
        for role in CYCLE:
            stage = self.stages[role]
            problems += [Problem(f"stages.{role}/{p.where}", p.message) for p in stage.validate()]
            output = stage.contract.output
            engines = (
                [(f"stages.{role}.pipelines.{n}", stage.item(n)) for n in stage.node_ids]
                if stage.selects
                else [(f"stages.{role}", stage)]
            )
            # the Creator's pipelines each make one kind of artifact: an `image`, `video` or `audio` output
            wanted = KINDS if stage.contract.output_schema is Schema.ARTIFACTS else (output,)
            for where, engine in engines:
                if not set(wanted) & set(engine.exposed_outputs):
                    problems.append(
                        Problem(
                            where,
                            f"must expose an output {' or '.join(repr(w) for w in wanted)} (what the {role} "
                            f"writes); it exposes: {', '.join(engine.exposed_outputs) or 'nothing'}",
                        )
                    )
        return problems

    # ---- the cycle -------------------------------------------------------------------------------------
    @property
    def state(self) -> WorldState:
        return self.progress.state

    @property
    def directory(self) -> Path:
        """The world's local directory (for a world on a store: its local cache; `storage.location` is the
        URI)."""
        return self.storage.root

    def step(self, action: str | None = None, state: WorldState | Mapping | None = None) -> StepReport:
        """One pass around the cycle (or the rest of a pass a crash interrupted)."""
        p = self.progress
        in_flight = p.stage_index > 0
        if in_flight and state is not None:
            raise StepInFlightError(
                "a step is in flight (resumed after a stop); finish it with step() before passing a state"
            )
        if in_flight and action is not None:
            if p.stage_index > CYCLE.index(role_that(lambda c: c.receives_action)):
                raise StepInFlightError(
                    "a step is in flight past Development; finish it with step() before a new action"
                )
            p.action = action
        if not in_flight:
            p.action = action
            p.ran, p.skipped, p.episode = [], [], None
            if state is not None:
                given = WorldState.from_blocks(state)
                # a bad request (limits, pipeline, references, video source) fails here, before any stage runs
                self._plan(given.generation, "state.generation")
                if given.id != p.state.id:
                    self.storage.discard_artifacts(p.state.id)  # the state it replaces will never be saved
                self._new_state(self._adopt(given), None)
        for index in range(p.stage_index, len(CYCLE)):
            role = CYCLE[index]
            stage = self.stages[role]
            ran = stage.should_run(p.state)
            if ran:
                # A stage past its wall time fails (DeadlineExceeded) before anything of it is persisted, so
                # the next step runs it again from the last persisted point.
                seconds = self.limits.stage_seconds if self.limits is not None else None
                with applying(self.limits), within(time_limit(seconds, "the stage")):
                    self._run(role, stage)
                p.ran.append(role)
            else:
                if stage.contract.saves_episode and p.state.filled():  # incomplete: the state is dropped
                    self.storage.discard_artifacts(p.state.id)
                    self._new_state(WorldState(), None)
                p.skipped.append(role)
            p.stage_index = index + 1
            # Persist after every stage that did work (a skip is re-derived from the same state on resume);
            # the last stage's result is persisted with the end of the step below.
            if index == len(CYCLE) - 1:
                break
            if ran:
                self.storage.save_progress(p)
            self._notify(role, ran, p.step + 1)
        report = StepReport(p.step + 1, list(p.ran), list(p.skipped), p.episode, p.state)
        p.step, p.stage_index, p.action = p.step + 1, 0, None
        p.ran, p.skipped, p.episode = [], [], None
        self.storage.save_progress(p)
        self._notify(CYCLE[-1], CYCLE[-1] in report.ran, report.step)
        return report

    def _notify(self, role: str, ran: bool, step: int) -> None:
        """Callbacks hear of a stage once what it did is persisted (a skip needs no persisting)."""
        for cb in self.callbacks:
            cb(role, "ran" if ran else "skipped", step)

    def run(self, steps: int, action: str | None = None) -> list[StepReport]:
        """`steps` passes; `action` (if any) goes to the first one's Development. Writes the report at the end."""
        reports = [self.step(action=action if i == 0 else None) for i in range(steps)]
        self.write_report()
        return reports

    def write_report(self) -> Path:
        """report.html / report.md of every episode (each episode's own episode.md is written when it is saved).

        Not rewritten on every step: it grows with the world; `run()`, `save()` and the CLI write it."""
        return self.storage.write_report()

    def history(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """The saved episodes, oldest first (from `offset`, at most `limit`): number, five blocks, meta."""
        numbers = self.storage.episodes()[offset:]
        out = []
        for number in numbers if limit is None else numbers[:limit]:
            state, meta = self.storage.load_episode(number)
            out.append({"episode": number, "state": state.model_dump(mode="json"), **meta})
        return out

    # ---- stages ----------------------------------------------------------------------------------------
    def _seed(self, role: str) -> int:
        return stage_seed(self.settings.seed, self.progress.step + 1, role)

    def _context(self, role: str) -> dict[str, Any]:
        return stage_context(
            role,
            self.progress.state,
            self.content,
            action=self.progress.action,
            step=self.progress.step + 1,
            pipelines=list(self.selecting_stage.node_ids),
            defaults=self.settings.generation_defaults.model_dump(),
            seed=self._seed(role),
            controls=self.selecting_stage.controls(),
            kinds=self.selecting_stage.kinds(),
            sources=self.selecting_stage.sources(),
        )

    def _inputs(self, role: str, engine: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The inputs `engine` exposes, from what the world offers a stage plus `given` (a request's)."""
        state = self.progress.state
        available = world_inputs(self._context(role), state, self.storage.local_artifact) | dict(given or {})
        inputs = {}
        for name, exposed in engine.exposed_inputs.items():
            if name in available:
                inputs[name] = available[name]
            elif not exposed.optional:
                control = next((c for c, (image, _, _) in REFERENCE_INPUTS.items() if image == name), None)
                hint = f" (block 2's `reference` with control '{control}' feeds it)" if control else ""
                raise ConfigError(
                    f"stage '{role}' needs input '{name}', which the world does not provide{hint}; world inputs "
                    f"are: {', '.join(sorted(available))}",
                    path=f"stages.{role}",
                )
        return inputs

    def _call(
        self, role: str, engine: Any, seed: int, given: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            return engine.run(self._inputs(role, engine, given), seed=seed, executor=self.settings.executor)
        except WorldgenError as err:
            err.args = (f"stage '{role}': {err}",)  # keep the error's type; say which stage
            raise

    @property
    def selecting_stage(self) -> Stage:
        """The stage whose pipeline block 2 selects (the Creator): its pipelines are the names block 2 may ask
        for."""
        return self.stages[role_that(lambda c: c.selects_pipeline)]

    def _run(self, role: str, stage: Stage) -> None:
        """Run a stage and put what it made where its contract says."""
        p = self.progress
        contract = stage.contract
        if contract.output_schema is Schema.ARTIFACTS:
            value: Any = self._create(role, stage)
        elif contract.output_schema is Schema.GENERATION_CONFIG:
            value = self._generation(role, self._output(role, stage))
        else:
            value = str(self._output(role, stage))
        if contract.saves_episode:
            self._update_world(value)
        elif contract.starts_state:
            self._new_state(WorldState().with_block(contract.writes, value), p.action)
        else:
            p.state = p.state.with_block(contract.writes, value)

    def _output(self, role: str, stage: Stage) -> Any:
        """What the stage's contract output holds after one run of the whole stage."""
        output = stage.contract.output
        result = self._call(role, stage, self._seed(role)).get(output)
        if result is None:
            raise ExecutionError(f"stage '{role}' produced no '{output}' output")
        return result

    def _generation(self, role: str, data: Any) -> list:
        """The Architect's output as block 2: validated, and planned against the Creator and the world."""
        try:
            requests = _GENERATION.validate_python(data)
        except ValidationError as err:
            raise ExecutionError(
                f"stage '{role}': invalid generation config: {format_validation_error(err)}"
            ) from None
        try:
            self._plan(requests, "generation")
        except LimitExceeded as err:
            err.args = (f"stage '{role}': block 2: {err}",)  # keep the type (and the limit); say where
            raise
        except ConfigError as err:
            raise ConfigError(f"stage '{role}': block 2: {err.detail}", path=err.path) from None
        return requests

    def _plan(self, requests: list | None, where: str) -> creation.Plan:
        """Block 2 checked before the Creator runs anything (worldgen.creation)."""
        return creation.plan(requests, self.selecting_stage, self.storage, where=where, limits=self.limits)

    def _create(self, role: str, stage: Stage) -> list:
        """Each of block 2's requests run by its pipeline, in order, once per artifact asked for (seeds in a row);
        the artifacts saved. References feed earlier episodes' images (recorded with the episode); a clip starts
        from an image of an earlier request or episode."""
        p = self.progress
        plan = self._plan(p.state.generation, "generation")
        if stage.contract.feeds_references:
            p.state_references = plan.all_references()
        base = self._seed(role)
        refs: list = []
        made: dict[int, list] = {}  # request -> its artifacts
        for i, (request, engine) in enumerate(zip(plan.requests, plan.engines, strict=True)):
            given = creation.request_inputs(request)
            if stage.contract.feeds_references and plan.references[i]:
                given |= reference_inputs(
                    plan.references[i],
                    self.storage,
                    width=request.width,
                    height=request.height,
                    where=f"generation.{i}",
                )
            image = creation.source_image(plan, i, made, self.storage, "generation")
            if image is not None:
                given[creation.SOURCE_INPUT] = image
            seed = request.seed if request.seed is not None else base + 7919 * i  # a request's own seeds
            media = [
                m
                for k in range(request.count)
                for m in creation.media_of(
                    request, i, self._call(role, engine, seed + k, given), plan.sources[i]
                )
            ]
            # saved after each request, so a later clip reads this request's images from the world's storage
            made[i] = self.storage.save_artifacts(p.state.id, media, after=refs)[len(refs) :]
            refs += made[i]
        return refs

    def _update_world(self, story: str) -> None:
        """Save the complete state as an episode and apply it to the content — each exactly once."""
        p = self.progress
        p.episode = self.storage.save_episode(
            p.state, step=p.step + 1, action=p.state_action, ran=list(p.ran), references=p.state_references
        )
        if self.content.last_state_id != p.state.id:
            self.content.story = story
            self.content.history.append(p.state.outcome or "")
            self.content.last_state_id = p.state.id
            self.storage.save_content(self.content)
        self._new_state(WorldState(), None)

    def _new_state(self, state: WorldState, action: str | None) -> None:
        """The state in flight replaced: what was recorded for the old one (its action, what its references fed)
        goes with it."""
        p = self.progress
        p.state, p.state_action, p.state_references = state, action, []

    def _adopt(self, state: WorldState) -> WorldState:
        """Copy user-supplied artifact files into the world directory (block 3 then refers to them there): images
        as PNG, clips and sounds re-encoded in the world's formats."""
        if not state.artifacts:
            return state
        media = []
        for i, ref in enumerate(state.artifacts):
            path = Path(ref.path)
            if not path.is_absolute() and (self.storage.root / path).exists():
                path = self.storage.root / path
            if not path.exists():
                raise ConfigError(f"block 3 artifact '{ref.path}' does not exist", path=f"state.3.{i}")
            try:
                media.append(read_media(path))
            except Exception as err:  # not a file of a kind worldgen reads, or a broken one
                raise ConfigError(f"block 3 artifact '{ref.path}': {err}", path=f"state.3.{i}") from None
        return state.with_block(3, self.storage.save_artifacts(state.id, media))

    def __repr__(self) -> str:
        return f"World({self.settings.name!r}, step={self.progress.step}, directory='{self.storage.root}')"


def stored_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A world config as its directory stores it (world.yaml): `ref:` includes inlined (relative to the config's
    file, or the working directory for a mapping) and a custom world's `base` and `adapters` made absolute, so a
    reload reads no other file and two configs of one world compare equal. `${env:NAME}` stays a reference."""
    config, _, base = _source(config)
    if "base" in config:
        reference, adapters = _custom_paths(config, base)
        config = {**config, "base": str(reference), "adapters": str(adapters)}
    return config


def _source(config: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], str | None, Path]:
    """(the config with its `ref:` includes inlined, its file, the folder its relative paths start from)."""
    if isinstance(config, (str, Path)):
        return load_config_file(config), str(config), Path(config).resolve().parent
    return resolve_refs(dict(config), base=Path.cwd()), None, Path.cwd()


def _custom_paths(config: Mapping[str, Any], base: Path) -> tuple[Path, Path]:
    """A custom world's base world (directory or config file) and adapters folder, absolute."""
    return (
        (base / str(config["base"])).resolve(),
        (base / str(config.get("adapters", "adapters"))).resolve(),
    )


# ---- what a stage is given (shared with worldgen.training, which rebuilds it from saved episodes) --------
def stage_seed(world_seed: int, step: int, role: str) -> int:
    """The seed of `role`'s run in step `step` (1-based) of a world seeded with `world_seed`."""
    return (world_seed * 1_000_003 + step * 101 + CYCLE.index(role)) % 2**31


def stage_context(
    role: str,
    state: WorldState,
    content: WorldContent,
    *,
    action: str | None,
    step: int,
    pipelines: list[str],
    defaults: Mapping[str, Any],
    seed: int,
    controls: Mapping[str, list[str]] | None = None,
    kinds: Mapping[str, str] | None = None,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """The `context` input of a stage: the variables its prompt templates are rendered with. `controls`: for each
    pipeline, the controls a reference in block 2 may give it (Stage.controls); `kinds`: what each pipeline makes
    (image, video or audio: Stage.kinds), so the Architect asks each for what it can make; `sources`: the video
    pipelines that start a clip from an image (Stage.sources)."""
    blocks = state.model_dump(mode="json")
    blocks.pop("id")
    return {
        "state": blocks,
        "content": content.model_dump(mode="json", exclude={"last_state_id"}),
        "action": action if CONTRACTS[role].receives_action else None,  # the Action goes only to Development
        "step": step,
        "pipelines": list(pipelines),
        "defaults": dict(defaults),
        "seed": seed,
        "controls": {name: list(c) for name, c in (controls or {}).items()},
        "kinds": dict(kinds or {}),
        "sources": list(sources or []),
    }


def world_inputs(
    context: dict[str, Any], state: WorldState, artifact_path: Callable[[Any], Path]
) -> dict[str, Any]:
    """Every input the world offers a stage (see worldgen.stage): the context and block 3's files (a request's
    inputs are the Creator's: worldgen.creation); `artifact_path` turns a block-3 reference into its file."""
    available: dict[str, Any] = {"context": context}
    if state.artifacts:
        # every artifact, of every kind, in block 3's order (`images`: the name stages had when all were images)
        available["artifacts"] = available["images"] = [str(artifact_path(a)) for a in state.artifacts]
    return available


def _build_stage(role: str, spec: Mapping[str, Any]) -> Stage:
    """A stage from its config; a config without `pipelines` is one graph/pipeline, its ports exposed as-is."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            "expected a stage config: {pipelines: …} or one graph/pipeline ({template: …}, {ref: …})"
        )
    if "pipelines" in spec:
        return Stage.from_config({**spec, "kind": "stage", "role": role, "name": spec.get("name", role)})
    stage = Stage(role, role=role)
    # a selecting stage's pipelines are alternatives named by block 2 (so keep the item's own name), not wired
    item_id = stage.add_pipeline(build_item(spec), id=None if stage.selects else "main")
    item = stage.item(item_id)
    if not stage.selects:
        for name in item.exposed_inputs:
            stage.expose_input(name, f"{item_id}.{name}")
        for name in item.exposed_outputs:
            stage.expose_output(name, f"{item_id}.{name}")
    return stage
