"""Templates: named builders of graphs, pipelines and world configs with keyword parameters, each registered
with the kind of thing it builds.

The builders live in this package (diffusion.py, worlds.py); the registry they register with is
worldgen/registry.py, so that `Engine.from_template` finds them without importing this package.
"""

from worldgen.registry import (
    build_template,
    build_world_template,
    built_kind,
    list_templates,
    register_template,
    template_params,
)

__all__ = [
    "build_template",
    "build_world_template",
    "built_kind",
    "list_templates",
    "register_template",
    "template_params",
]
