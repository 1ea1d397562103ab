"""Model references: where a block's model comes from (its identity key drives model reuse), where its host
actor runs, and the LoRA adapter it runs with. Plain data, below the blocks and the model loaders that read it."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Placement(BaseModel):
    """Where the model's host actor runs on Ray (resources it reserves, restarts). Not part of its identity: the
    first host created for a model decides (actors/placement.py sizes it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="auto: a GPU share sized from the model's bytes when the cluster has GPUs, else a CPU host; "
        "cpu: never a GPU; gpu: always a GPU share (an error on a cluster without GPUs that cannot grow). "
        "An explicit num_gpus > 0 or memory is used as given, whatever the mode",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GiB of memory per GPU to size the share against (default: from the nodes' accelerator type, "
        "else the WORLDGEN_GPU_MEMORY_GB env var, else 16)",
    )
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved by the host actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the host actor (fractions share a GPU)")
    memory: int | None = Field(None, ge=0, description="bytes of memory reserved by the host actor")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources reserved by the host actor, e.g. {L4: 1}"
    )
    max_restarts: int = Field(3, ge=-1, description="restarts of a failed host actor (-1: unlimited)")


class Runtime(BaseModel):
    """How a loaded model runs (acceleration options), applied after loading wherever the model lives (a model
    host, the local pool). Not part of the identity: the first host or pool entry created for a model decides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels_last: bool = Field(False, description="convolution weights in channels-last memory format")
    attention: Literal["default", "sdpa", "math", "eager"] = Field(
        "default",
        description="attention backend: sdpa (torch's scaled_dot_product_attention), math/eager (the plain "
        "matmul-softmax one); default keeps the library's choice",
    )
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field(
            False,
            description="torch.compile the model after loading (true: mode 'default'); compiles on first call",
        )
    )


class ModelRef(BaseModel):
    """Where a block's model comes from: a local diffusers/transformers directory, a hub id, or `preset:<name>`.

    Two references with the same identity key are the same model: it is loaded once and stored once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="local directory, hub id, or 'preset:<name>' for built-in tiny models")
    revision: str | None = None
    subfolder: str | None = None
    dtype: str = Field(
        "float32",
        description="float32, float16, bfloat16…; 'auto': bfloat16 (float16 where unsupported) on CUDA, float32 on "
        "CPU, resolved where the model is loaded (the identity keeps 'auto')",
    )
    variant: str | None = None
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1'…; default: a GPU when there is one")
    reuse: bool = Field(True, description="share one instance with every other user of the same model")
    placement: Placement = Field(default_factory=Placement, description="host-actor resources on Ray")
    runtime: Runtime = Field(
        default_factory=Runtime, description="acceleration options (channels_last, attention, compile)"
    )

    def identity_key(self) -> str:
        """Readable, stable identity of the loaded model (everything that changes what gets loaded)."""
        parts = [self.source, self.revision or "main", self.subfolder or "", self.dtype, self.variant or ""]
        return "|".join(parts + ([self.device] if self.device else []))

    def slug(self) -> str:
        """Short name-safe form of the identity key (for actor names, directories)."""
        digest = hashlib.sha1(self.identity_key().encode()).hexdigest()[:12]
        tail = (self.subfolder or self.source.rstrip("/").split("/")[-1] or "model").replace(":", "-")
        return f"{tail}-{digest}"


class AdapterRef(BaseModel):
    """A LoRA adapter the block's model runs with (see worldgen/lora.py and worldgen/models/adapters.py): its name on the model, and the PEFT
    adapter directory it is loaded from (None: attached in memory, as during training)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None
