"""How many replicas a Serve deployment runs and what each asks of the cluster, from an application's `args`.

Every application (the world gateway, the graph endpoint, the LLM server) takes the same three settings:

    num_replicas: 2                    # a fixed count ...
    autoscaling:                       # ... or Serve's autoscaling (then num_replicas is left out)
      min_replicas: 2
      max_replicas: 8
      target_ongoing_requests: 4
    ray_actor_options: {num_cpus: 1}   # per replica; a positive num_cpus keeps replicas off a head with CPU: 0

`Scaling.deployment_options` turns them into the keyword arguments of `Deployment.options`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Autoscaling(BaseModel):
    """Serve's `autoscaling_config`, the fields an operator sets (Serve's defaults for the rest)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="replicas kept running however quiet it is")
    max_replicas: int = Field(ge=1, description="replicas at the busiest")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy (default: min_replicas)")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="requests in flight per replica that autoscaling aims at"
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, description="load must last this long before scaling up"
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, description="quiet must last this long before scaling down"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas and max_replicas"
            )
        return self


class Scaling(BaseModel):
    """The replica settings every application's args share (the world gateway's, the graph endpoint's, the LLM
    server's settings are Scaling with their own fields added)."""

    num_replicas: int | Literal["auto"] = Field(
        1, description="replicas (a count, or 'auto': Serve's default autoscaling); or give `autoscaling`"
    )
    autoscaling: Autoscaling | None = Field(
        None,
        description="Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests) instead of "
        "num_replicas",
    )
    ray_actor_options: dict[str, Any] | None = Field(
        None, description="per replica, e.g. {num_cpus: 1, num_gpus: 1} (default: Serve's, one CPU)"
    )

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> Scaling:
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError("num_replicas must be at least 1 (or 'auto')")
        # Serve takes a replica count or an autoscaling config, not both
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("give either `num_replicas` or `autoscaling`, not both")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """`Deployment.options(**...)` for these settings."""
        options: dict[str, Any] = {}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        if self.ray_actor_options:
            options["ray_actor_options"] = dict(self.ray_actor_options)
        return options
