"""The `lora:` template option: LoRA files on a family graph's backbone and text encoders.

    Graph.from_template("text_to_image", preset="tiny", lora=[{path: style.safetensors, weight: 0.8}, ...])

adds one `adapter/lora` node per file (`lora`, `lora_2`, ...) and wires each into every node of the graph that
takes LoRA files: the backbone (`unet`, Flux's `flux`) and each text encoder with its negative-prompt twin
(`te`/`te_neg`, SDXL's `te_2`/`te_2_neg` too), as `pipe.load_lora_weights` + `pipe.set_adapters(names, weights)`
apply them to the pipeline's backbone and text encoders. (SD3 is refused until it has a parity test.) Each block takes only its own component's part of a file. The weights become
optional graph inputs `lora_weight`, `lora_weight_2`, ... (default: the spec's), so a caller can turn a LoRA up,
down or off per run without rebuilding the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worldgen.block import ModelBlock
from worldgen.errors import ConfigError, format_validation_error
from worldgen.models.lora_files import file_components, lora_file_keys
from worldgen.templates.families import Attachment, Family, register_attachment

SUPPORTED = ("sd", "sdxl", "flux")


class LoraSpec(BaseModel):
    """One entry of `lora:` (a bare string is its `path`)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the LoRA .safetensors file (diffusers, kohya/A1111 or PEFT key names)")
    weight: float = Field(1.0, allow_inf_nan=False, description="its strength (as in pipe.set_adapters)")
    name: str | None = Field(None, description="the adapter's name (default: the file's stem)")


def parse_specs(spec: Any) -> list[tuple[str, LoraSpec]]:
    """`lora:`'s value (one mapping or path, or a list of them) as (where in the config, LoraSpec) pairs."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ConfigError(
            "expected one or more LoRA files ({path, weight, name}), got an empty list", path="lora"
        )
    specs = []
    for i, item in enumerate(items):
        where = f"lora[{i}]" if isinstance(spec, list) else "lora"
        data = {"path": item} if isinstance(item, str) else item
        try:
            specs.append((where, LoraSpec.model_validate(data)))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, where), path=where) from None
    names = [s.name or Path(s.path).stem for _, s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two LoRA files share a name ({names}); set `name` on one of them", path="lora")
    return specs


def attach_lora(graph: Any, *, family: Family, task: str, ref: dict[str, Any], spec: Any) -> None:
    """Add an `adapter/lora` node per file and feed it to every block of `graph` that takes LoRA files."""
    if family.name not in SUPPORTED:
        raise ConfigError(
            f"`lora:` is supported for the {', '.join(SUPPORTED)} families, not {family.name}", path="lora"
        )
    targets = [
        node_id
        for node_id, block in graph.blocks()
        if isinstance(block, ModelBlock) and "lora" in block.input_ports()
    ]
    components = {graph.block(t).lora_component() for t in targets}
    for i, (where, entry) in enumerate(parse_specs(spec)):
        path = Path(entry.path).expanduser().resolve()  # relative: to the working directory
        try:
            keys = lora_file_keys(path)
        except ConfigError as err:
            raise ConfigError(err.detail, path=f"{where}.path") from None
        found = file_components(keys)
        if not found & components:  # e.g. a Flux LoRA on an SD graph: it would silently change nothing
            raise ConfigError(
                f"LoRA file {path} has weights for {sorted(found)}, none of which this {family.name} graph has "
                f"({sorted(c for c in components if c)}); first keys: {keys[:3]}",
                path=f"{where}.path",
            )
        node_id = "lora" if i == 0 else f"lora_{i + 1}"
        config = {"path": str(path), "weight": entry.weight, "name": entry.name}
        graph.add_node("adapter/lora", id=node_id, config=config, auto_connect=False)
        for target in targets:
            graph.add_edge(f"{node_id}.lora", f"{target}.lora")
        weight_input = "lora_weight" if i == 0 else f"lora_weight_{i + 1}"
        graph.expose_input(weight_input, f"{node_id}.weight", default=entry.weight)


register_attachment(
    Attachment(
        "lora",
        attach_lora,
        "LoRA files on the backbone and text encoders: [{path, weight, name}] (as load_lora_weights + "
        "set_adapters)",
    )
)
