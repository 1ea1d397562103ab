"""How many replicas a Serve deployment runs and what each asks of the cluster, from an application's `args`.

Every application (the world gateway, the graph endpoint, the LLM server) takes the same three settings:

    num_replicas: 2                    # a fixed count ...
    autoscaling:                       # ... or Serve's autoscaling (then num_replicas is left out)
      min_replicas: 2
      max_replicas: 8
      target_ongoing_requests: 4
    ray_actor_options: {num_cpus: 1}   # per replica; a positive num_cpus keeps replicas off a head with CPU: 0

`deployment_options` turns them into the keyword arguments of `Deployment.options`.
"""

from __future__ import annotations

from typing import Any

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


def deployment_options(
    num_replicas: int | str,
    autoscaling: Autoscaling | None,
    ray_actor_options: dict[str, Any] | None,
    *,
    num_replicas_given: bool,
) -> dict[str, Any]:
    """`Deployment.options(**...)` for these settings. Serve takes either a replica count or an autoscaling
    config: both given (`num_replicas_given`: the args named num_replicas) is a ValueError naming both."""
    if autoscaling is not None and num_replicas_given and num_replicas != "auto":
        raise ValueError("give either `num_replicas` or `autoscaling`, not both")
    options: dict[str, Any] = {}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = num_replicas
    if ray_actor_options:
        options["ray_actor_options"] = dict(ray_actor_options)
    return options
