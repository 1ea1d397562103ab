"""Templates: named builders of graphs, pipelines and world configs with keyword parameters.

The builders live in this package (diffusion.py, worlds.py); the registry they register with is
worldgen/registry.py, so that `Engine.from_template` finds them without importing this package.
"""

from worldgen.registry import build_template, list_templates, register_template, template_params

__all__ = ["build_template", "list_templates", "register_template", "template_params"]
