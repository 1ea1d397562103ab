"""Small pure-Python blocks for engine tests (registered under the `toy` role)."""

from __future__ import annotations

from pydantic import Field

import worldgen as wg
from worldgen.ports import Aggregation, Port, PortKind

K = PortKind


class ScaleConfig(wg.BlockConfig):
    factor: float = Field(2.0, description="multiplier")


@wg.register_block
class Scale(wg.Block):
    block_type = "toy/scale"
    Config = ScaleConfig
    INPUTS = (Port("x", K.SCALAR),)
    OUTPUTS = (Port("y", K.SCALAR),)

    def forward(self, x):
        return {"y": x * self.config.factor}


@wg.register_block
class ScaleInline(Scale):
    """`toy/scale` that a distributed executor runs where the run is driven (its output is a plain value)."""

    block_type = "toy/scale_inline"
    inline = True


@wg.register_block
class Add(wg.Block):
    block_type = "toy/add"
    INPUTS = (Port("a", K.SCALAR), Port("b", K.SCALAR, optional=True, default=0.0))
    OUTPUTS = (Port("y", K.SCALAR),)

    def forward(self, a, b=0.0):
        return {"y": a + b}


@wg.register_block
class Sum(wg.Block):
    block_type = "toy/sum"
    INPUTS = (Port("values", K.SCALAR, aggregate=Aggregation.LIST),)
    OUTPUTS = (Port("y", K.SCALAR),)

    def forward(self, values):
        return {"y": sum(values) if isinstance(values, list) else values}


@wg.register_block
class SumWhere(Sum):
    """`toy/sum` that also reports the process it ran in (tests tell the local executor from Ray by it)."""

    block_type = "toy/sum_where"
    OUTPUTS = (Port("y", K.SCALAR), Port("pid", K.INT))

    def forward(self, values):
        import os

        return {**super().forward(values), "pid": os.getpid()}


@wg.register_block
class Text(wg.Block):
    block_type = "toy/text"
    INPUTS = (Port("text", K.TEXT),)
    OUTPUTS = (Port("text", K.TEXT),)

    def forward(self, text):
        return {"text": text.upper()}


class CountdownConfig(wg.BlockConfig):
    steps: int = 3


@wg.register_block
class Countdown(wg.Block):
    """A loop controller: says how many iterations its loop runs (like a solver)."""

    block_type = "toy/countdown"
    Config = CountdownConfig
    INPUTS = (Port("x", K.SCALAR),)
    OUTPUTS = (Port("x", K.SCALAR),)

    def forward(self, x):
        return {"x": x}

    def loop_iterations(self, inputs):
        return self.config.steps


@wg.register_block
class WhereInline(wg.Block):
    """Reports the process it ran in; `inline`: a distributed executor runs it in the driving process."""

    block_type = "toy/where_inline"
    inline = True
    INPUTS = (Port("x", K.ANY, optional=True),)
    OUTPUTS = (Port("pid", K.INT),)

    def forward(self, x=None):
        import os

        return {"pid": os.getpid()}


@wg.register_block
class WhereTask(WhereInline):
    block_type = "toy/where_task"
    inline = False


class SlowConfig(wg.BlockConfig):
    seconds: float = Field(0.2, description="how long each call takes")


@wg.register_block
class Slow(wg.Block):
    """Passes its input on after `seconds` (for wall-time limits)."""

    block_type = "toy/slow"
    Config = SlowConfig
    INPUTS = (Port("x", K.ANY),)
    OUTPUTS = (Port("x", K.ANY),)

    def forward(self, x):
        import time

        time.sleep(self.config.seconds)
        return {"x": x}


@wg.register_block
class PanClip(wg.Block):
    """A clip made from a picture: each frame the picture rolled `speed` pixels further right (a camera pan), so
    a test knows every frame. Refuses more than 64 frames (a model's own limit, checked before a run)."""

    block_type = "toy/pan_clip"
    INPUTS = (
        Port("image", K.IMAGE),
        Port("frames", K.INT, optional=True, default=5),
        Port("prompt", K.TEXT, optional=True, default=""),
    )
    OUTPUTS = (Port("video", K.VIDEO),)
    speed = 2

    def check_inputs(self, inputs):
        frames = inputs.get("frames")
        if isinstance(frames, int) and not 1 <= frames <= 64:
            raise wg.ConfigError(f"frames {frames}: this model makes 1 to 64 frames", path="frames")
        return super().check_inputs(inputs)

    def forward(self, image, frames=5, prompt=""):
        import torch

        clip = [torch.roll(image, shifts=self.speed * f, dims=-1) for f in range(frames)]
        return {"video": torch.stack(clip, dim=1)}  # (B, F, C, H, W)


@wg.register_block
class Tone(wg.Block):
    """A stereo sine of `duration` seconds at 8 kHz: the left channel at 440 Hz, the right at 880 Hz. Refuses
    more than 4 seconds (a model's own limit, checked before a run)."""

    block_type = "toy/tone"
    INPUTS = (
        Port("duration", K.SCALAR, optional=True, default=0.25),
        Port("prompt", K.TEXT, optional=True, default=""),
    )
    OUTPUTS = (Port("audio", K.AUDIO), Port("sample_rate", K.INT))
    rate = 8000

    def check_inputs(self, inputs):
        duration = inputs.get("duration")
        if isinstance(duration, (int, float)) and duration > 4:
            raise wg.ConfigError(
                f"duration {duration} s is over this model's maximum of 4 s", path="duration"
            )
        return super().check_inputs(inputs)

    def forward(self, duration=0.25, prompt=""):
        import torch

        t = torch.arange(round(duration * self.rate)) / self.rate
        sound = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 880 * t)]) * 0.5
        return {"audio": sound[None], "sample_rate": self.rate}


@wg.register_block
class Clip(wg.Block):
    """A (B, F, 3, H, W) clip in [0, 1]: a bar sweeping right (graph endpoints and `worldgen generate` write it)."""

    block_type = "toy/clip"
    INPUTS = (
        Port("frames", K.INT, optional=True, default=4),
        Port("batch_size", K.INT, optional=True, default=1),
    )
    OUTPUTS = (Port("video", K.VIDEO),)

    def forward(self, frames=4, batch_size=1):
        import torch

        clip = torch.zeros(batch_size, frames, 3, 16, 24)
        for f in range(frames):
            clip[:, f, :, :, f * 24 // frames : f * 24 // frames + 4] = 1.0
        return {"video": clip}
