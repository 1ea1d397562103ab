"""Text task nodes: tokenizers (CLIP byte-level BPE, T5 SentencePiece/Unigram) and the text conditioners that
turn token ids into what a denoiser is conditioned on (CLIP per-token and pooled embeddings, T5 sequences).

They read prompts exactly as the diffusers pipelines do: SD 1.x/2.x take CLIP's last (normed) layer, SDXL and
SD3 its penultimate hidden state and the projected pooled embedding, Flux CLIP's pooled output and T5's sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from worldgen.block import ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


# ---- tokenizers ----------------------------------------------------------------------------------------
class TokenizerConfig(ModelConfig):
    max_length: int | None = Field(
        None, ge=1, description="pad (and truncate) to this many tokens (default: the model's)"
    )
    optional: bool = Field(
        False,
        description="no text (None) gives no tokens (None), and the conditioner after it no embedding: an "
        "optional prompt, such as Flux's negative prompt (true CFG only when given) or SDXL's (zeros when not "
        "given); otherwise None is refused",
    )
    truncate: bool | None = Field(
        None,
        description="cut a prompt longer than `max_length` (as the pipelines do, silently) instead of refusing it; "
        "default: CLIP cuts, T5 refuses",
    )


class _Tokenizer(ModelBlock):
    """Text → token ids padded to a fixed length, as the pipelines tokenize prompts."""

    Config = TokenizerConfig
    INPUTS = (
        Port("text", K.TEXT, doc="a prompt or a list of prompts"),
        Port(
            "fallback",
            K.TEXT,
            optional=True,
            doc="used when `text` is None or empty (a second encoder's prompt defaults to the first's, as the "
            "pipelines' `prompt_2 or prompt`)",
        ),
    )
    OUTPUTS = (Port("token_ids", K.TOKENS), Port("attention_mask", K.MASK))
    # Tokenizing takes well under a millisecond and the tokenizer is a few files: a distributed executor runs it
    # where the run is driven (its own copy of the tokenizer) instead of paying an actor round trip.
    inline = True
    cuts_by_default: bool = True  # cut prompts longer than the length (else: a ConfigError naming the prompt)

    @property
    def truncates(self) -> bool:
        return self.cuts_by_default if self.config.truncate is None else self.config.truncate

    def max_length(self) -> int:
        return int(self.config.max_length or self.model.model_max_length)

    def _text(self, text: Any, fallback: Any) -> tuple[Any, str]:
        """The text to tokenize and the port it came from: `fallback` stands in for no text; no text at all
        is refused unless the config says the prompt is `optional`."""
        if not text and fallback is not None:
            return fallback, "fallback"
        if text is None and not self.config.optional:
            raise ConfigError("no text given (a prompt or a list of prompts)", path="text")
        return text, "text"

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "text" not in inputs or (not inputs["text"] and "fallback" not in inputs):
            return Work()  # the text (or its fallback) comes from another node
        text, port = self._text(inputs["text"], inputs.get("fallback"))
        if isinstance(text, list):
            if not text:  # a batch of no prompts: the tokenizer would fail on it
                raise ConfigError("an empty list of prompts (give at least one)", path=port)
            self._check_length(text, port)
            return Work(items={port: len(text)})
        if isinstance(text, str):
            self._check_length([text], port)
            return Work(items={port: 1})
        return Work()

    def _check_length(self, prompts: list[str], port: str = "text") -> None:
        if self.truncates:
            return
        limit = self.max_length()
        for i, prompt in enumerate(prompts):
            count = len(self.model(prompt, truncation=False).input_ids)
            if count > limit:
                which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
                raise ConfigError(
                    f"{which} is {count} tokens long and this tokenizer takes at most {limit} (config "
                    "`max_length`): shorten it, raise `max_length` (its text encoder's limit permitting) or set "
                    "`truncate: true` to cut it",
                    path=port,
                )

    def forward(
        self, text: str | list[str] | None, fallback: str | list[str] | None = None
    ) -> dict[str, Any]:
        text, port = self._text(text, fallback)
        if text is None:  # an optional prompt that was not given
            return {"token_ids": None, "attention_mask": None}
        if not self.truncates:
            self._check_length([text] if isinstance(text, str) else list(text), port)
        encoded = self.model(
            text,
            padding="max_length",
            max_length=self.max_length(),
            truncation=True,
            return_tensors="pt",
        )
        return {"token_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


@register_block
class CLIPTokenizerBlock(_Tokenizer):
    """CLIP's byte-level BPE (77 tokens); longer prompts are cut, as every CLIP pipeline does."""

    block_type = "tokenizer/clip"
    default_subfolder = "tokenizer"

    def model_class(self) -> type:
        from transformers import CLIPTokenizer

        return CLIPTokenizer


@register_block
class T5TokenizerBlock(_Tokenizer):
    """T5's SentencePiece (Unigram) tokenizer, for the T5 conditioner of SD3 and Flux. A prompt longer than
    `max_length` is refused unless the config says `truncate: true` (the pipelines cut it with only a log
    warning, so the image would silently lose the end of the prompt)."""

    block_type = "tokenizer/t5"
    default_subfolder = "tokenizer_3"
    cuts_by_default = False

    def model_class(self) -> type:
        from transformers import T5TokenizerFast

        return T5TokenizerFast


# ---- conditioners --------------------------------------------------------------------------------------
class CLIPTextConfig(ModelConfig):
    clip_skip: int | None = Field(
        None, ge=1, description="use the hidden state this many layers before the one `layer` names"
    )
    layer: Literal["final", "penultimate", "last_raw"] = Field(
        "final",
        description="'final': the last layer's normed output (SD 1.x/2.x); 'penultimate': the raw hidden state "
        "before the last layer (SDXL, SD3); 'last_raw': the last layer's hidden state before the final norm (the "
        "x2 latent upscaler)",
    )
    projection: bool = Field(
        False,
        description="the encoder has a text projection (CLIPTextModelWithProjection: SDXL's second encoder, SD3's "
        "two): `pooled` is the projected embedding",
    )


@register_block
class CLIPTextConditionerBlock(ModelBlock):
    """Token ids → per-token embeddings (the backbone's cross-attention condition) and the pooled embedding."""

    block_type = "conditioner/clip_text"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # the text encoder's attention projections
    Config = CLIPTextConfig
    default_subfolder = "text_encoder"
    INPUTS = (Port("token_ids", K.TOKENS), Port("attention_mask", K.MASK, optional=True))
    OUTPUTS = (Port("embedding", K.EMBEDDING), Port("pooled", K.EMBEDDING))

    def model_class(self) -> type:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if self.config.projection else CLIPTextModel

    @inference
    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        if token_ids is None:  # an optional prompt that was not given (see TokenizerConfig.optional)
            return {"embedding": None, "pooled": None}
        encoder = self.active_model()
        # Like the pipelines: the mask is only passed to encoders configured to use it.
        mask = attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        mask = mask.to(encoder.device) if mask is not None else None
        skip, penultimate = self.config.clip_skip, self.config.layer == "penultimate"
        raw = self.config.layer == "last_raw"
        out = encoder(
            token_ids.to(encoder.device),
            attention_mask=mask,
            output_hidden_states=penultimate or raw or skip is not None,
        )
        if raw:
            embedding = out.hidden_states[-((skip or 0) + 1)]
        elif penultimate:
            embedding = out.hidden_states[-((skip or 0) + 2)]
        elif skip is None:
            embedding = out.last_hidden_state
        else:
            embedding = encoder.text_model.final_layer_norm(out.hidden_states[-(skip + 1)])
        pooled = out.text_embeds if self.config.projection else out.pooler_output
        return {"embedding": embedding.to(dtype=encoder.dtype), "pooled": pooled}


class T5TextConfig(ModelConfig):
    pass


@register_block
class T5TextConditionerBlock(ModelBlock):
    """Token ids → T5 encoder sequence (SD3's third and Flux's second text encoder)."""

    block_type = "conditioner/t5_text"
    lora_targets = ("q", "k", "v", "o")  # T5's attention projections
    Config = T5TextConfig
    default_subfolder = "text_encoder_3"
    INPUTS = (Port("token_ids", K.TOKENS), Port("attention_mask", K.MASK, optional=True))
    OUTPUTS = (Port("embedding", K.EMBEDDING),)

    def model_class(self) -> type:
        from transformers import T5EncoderModel

        return T5EncoderModel

    @inference
    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        # The mask is not passed, as the SD3 and Flux pipelines do not pass it: the models were trained
        # attending to the padding.
        if token_ids is None:  # an optional prompt that was not given (see TokenizerConfig.optional)
            return {"embedding": None}
        encoder = self.active_model()
        embedding = encoder(token_ids.to(encoder.device))[0]
        return {"embedding": embedding.to(dtype=encoder.dtype)}
