"""Parse+validate a typical chat request: msgspec vs pydantic v2 (same shape, same rules)."""
import json
import subprocess
import sys
import time
import timeit
from typing import Annotated, Literal, Optional, Union

BODY = json.dumps({"model": "smollm2-135m-instruct", "messages": [
    {"role": "system", "content": "You are a helpful assistant on a gateway."},
    {"role": "user", "content": "What is the temperature in the server room? Answer briefly."}],
    "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stream": True, "stop": ["\n\n"], "seed": 42}).encode()

import msgspec
from msgspec import Meta, Struct


class MMsg(Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, None] = None
    name: Optional[str] = None
class MChat(Struct, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[MMsg], Meta(min_length=1, max_length=256)]
    max_tokens: Optional[Annotated[int, Meta(ge=1, le=2**31-1)]] = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
mdec = msgspec.json.Decoder(MChat)

import pydantic
from pydantic import BaseModel, ConfigDict, Field


class PMsg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str] = None
    name: Optional[str] = None
class PChat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[PMsg] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, le=2**31-1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None

assert mdec.decode(BODY).temperature == PChat.model_validate_json(BODY).temperature
n = 20000
for name, fn in (("msgspec", lambda: mdec.decode(BODY)), ("pydantic", lambda: PChat.model_validate_json(BODY))):
    t = min(timeit.repeat(fn, number=n, repeat=5)) / n
    print(f"{name}: parse+validate {t*1e6:.2f} us per request")
for mod in ("msgspec", "pydantic"):
    code = f"import time,resource; t=time.perf_counter(); import {mod}; " + ("from pydantic import BaseModel; " if mod == "pydantic" else "") + \
        "print(f'{(time.perf_counter()-t)*1000:.1f} ms', open('/proc/self/status').read().split('VmRSS:')[1].split()[0], 'kB RSS')"
    base = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stdout.strip()
    print(f"import {mod}: {out} (bare interpreter {base} kB)")
