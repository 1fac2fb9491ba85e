"""Sampling parameters: each one's type and range, defined once. The engine validates its
`params` with SamplingParams; the sidecar's request schemas use the same annotated types."""

from __future__ import annotations

from typing import Annotated, Optional, Union

import msgspec
from msgspec import Meta

MAX_INT = 2**31 - 1
MAX_STOP = 16
MAX_STOP_CHARS = 256

MaxTokens = Annotated[int, Meta(ge=1, le=MAX_INT, description="the most tokens to generate")]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens holding this much probability")]
TopK = Annotated[int, Meta(ge=0, le=MAX_INT, description="sample among the k likeliest tokens (0: off)")]
# Bounded so that logits divided or multiplied by it stay finite in float32.
RepetitionPenalty = Annotated[float, Meta(ge=0.01, le=100.0, description="HF/CTRL style, over prompt and output (1: off)")]
PresencePenalty = Annotated[float, Meta(ge=-2.0, le=2.0, description="OpenAI style, over the output")]
FrequencyPenalty = Annotated[float, Meta(ge=-2.0, le=2.0, description="OpenAI style, over the output")]
# msgspec holds ints of up to 64 bits (signed or unsigned), which is the seed's range.
Seed = Annotated[int, Meta(ge=-(2**63), description="64-bit seed, signed or unsigned", extra_json_schema={"maximum": 2**64 - 1})]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Meta(max_length=MAX_STOP, description=f"up to {MAX_STOP} stop strings")]
_SEED_MAX = 2**64 - 1
TokenId = Annotated[int, Meta(ge=0, le=MAX_INT)]


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    seed: Optional[Seed] = None
    stop: Union[StopString, StopList] = []  # one string, as the OpenAI API allows, or a list
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.seed is not None and self.seed > _SEED_MAX:  # Meta bounds stop at int64
            raise ValueError(f"seed: must be at most {_SEED_MAX}, got {self.seed}")


class SamplingParams(_Sampling, kw_only=True):
    """The engine's `params` map (docs/engine-protocol.md)."""

    max_tokens: MaxTokens = 256


class RequestedSampling(_Sampling, kw_only=True):
    """Sampling as a client asked for it: a max_tokens it left out is the engine's to choose."""

    max_tokens: Optional[MaxTokens] = None
