"""Tokenizer export, a builder's job: read the tokenizer of a GGUF file (rebuilt for the
`tokenizers` library, with llama.cpp's pre-tokenizer flavours) or of a Hugging Face checkpoint,
and write the files edge_runtime/tokenizer.py loads."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import jinja2
import tokenizers
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ..chat_template import compile_chat_template
from ..errors import CheckpointError
from ..tokenizer import (
    CHAT_TEMPLATE_FILE,
    END_OF_GENERATION_TEXTS,
    EXTRA_KEY,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenizerInfo,
    load_backend,
    one_line,
    post_processor_adds_bos,
    read_json,
    special_token_id,
    special_tokens_of,
)

logger = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4
# The special tokens a GGUF names by id: tokenizer.ggml.<key>_token_id.
_GGUF_SPECIAL_TOKEN_KEYS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` flavour: the regexes, applied in turn."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself in the vocabulary is not merged piece by piece
    add_bos_default: bool = False  # when the file has no tokenizer.ggml.add_bos_token


_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
# Digits one at a time first: what the original tokenizer.json of these models does (Digits pre-tokenizer).
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos_default=True)
_LLAMA3_REGEX_ONLY = _PreTokenizer((_LLAMA3_SPLIT,))
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))
_GPT4O = _PreTokenizer((_GPT4O_SPLIT,))
_TEKKEN = _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos_default=True)
# Names and grouping follow llama.cpp (llama-vocab.cpp), the runtime GGUF files are written for.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"), _GPT2),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), _LLAMA3_REGEX_ONLY),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
    "tekken": _TEKKEN,
}


def _pre_tokenizer_for(flavour: str | None, source: pathlib.Path) -> _PreTokenizer:
    if flavour in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[flavour]
    logger.warning("%s: unknown tokenizer.ggml.pre %r, splitting text like GPT-2", source, flavour)
    return _GPT2


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in spelling):
        spelling[byte] = chr(256 + offset)
    return spelling


def _byte_spelled(token: str) -> str:
    # Some converters store a normal token as its text; the BPE model needs it in the byte alphabet.
    alphabet = _byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[byte] for byte in token.encode("utf-8"))


@dataclasses.dataclass
class _Exported:
    """A tokenizer read from a checkpoint, before it is written out."""

    backend: tokenizers.Tokenizer  # its post-processor adds the BOS, if the model wants one
    special_tokens: dict[str, str]  # name (bos_token, ...) -> token text
    eos_token_ids: list[int]
    chat_template: str | None


def _read_gguf_tokenizer_fields(path: pathlib.Path) -> dict[str, Any]:
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails in many ways on garbage (ValueError, struct errors, overflows)
        raise CheckpointError(f"{path}: not a valid GGUF file (corrupt or truncated: {one_line(exc)})") from exc
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def _gguf_field(fields: dict[str, Any], name: str, path: pathlib.Path) -> Any:
    if name not in fields:
        raise CheckpointError(f"{path}: GGUF metadata has no {name}")
    return fields[name]


def _gguf_backend(fields: dict[str, Any], flavour: _PreTokenizer, path: pathlib.Path) -> tokenizers.Tokenizer:
    tokens: list[str] = _gguf_field(fields, "tokenizer.ggml.tokens", path)
    merges: list[str] = _gguf_field(fields, "tokenizer.ggml.merges", path)
    token_types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = {_GGUF_CONTROL, _GGUF_USER_DEFINED}
    # Added tokens keep their text: they are matched whole in the input, never built from bytes.
    vocab = {
        token if kind in added else _byte_spelled(token): index
        for index, (token, kind) in enumerate(zip(tokens, token_types))
    }
    try:
        model = models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            ignore_merges=flavour.ignore_merges,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise CheckpointError(f"{path}: inconsistent tokenizer vocabulary ({one_line(exc)})") from exc
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in flavour.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_USER_DEFINED]
    )
    return backend


def _gguf_special_tokens(fields: dict[str, Any]) -> dict[str, str]:
    tokens = fields["tokenizer.ggml.tokens"]
    ids = {name: fields.get(f"tokenizer.ggml.{key}_token_id") for name, key in _GGUF_SPECIAL_TOKEN_KEYS.items()}
    return {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}


def _gguf_eos_ids(fields: dict[str, Any]) -> list[int]:
    """eos, plus the end-of-turn/end-of-message tokens and the control tokens llama.cpp treats as end of text."""
    ids = [fields.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    tokens = fields["tokenizer.ggml.tokens"]
    token_types = fields.get("tokenizer.ggml.token_type") or []
    ids += [i for i, kind in enumerate(token_types) if kind == _GGUF_CONTROL and tokens[i] in END_OF_GENERATION_TEXTS]
    return _unique_ids(ids, len(tokens))


def _export_gguf(path: pathlib.Path) -> _Exported:
    fields = _read_gguf_tokenizer_fields(path)
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, tokenizer.ggml.model 'gpt2')"
        )
    flavour = _pre_tokenizer_for(fields.get("tokenizer.ggml.pre"), path)
    backend = _gguf_backend(fields, flavour, path)
    special_tokens = _gguf_special_tokens(fields)
    if fields.get("tokenizer.ggml.add_bos_token", flavour.add_bos_default) and "bos_token" in special_tokens:
        backend.post_processor = _bos_post_processor(special_tokens["bos_token"], fields["tokenizer.ggml.bos_token_id"])
    return _Exported(
        backend=backend,
        special_tokens=special_tokens,
        eos_token_ids=_gguf_eos_ids(fields),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def _read_optional_json(path: pathlib.Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [item for item in value if isinstance(item, int)] if isinstance(value, list) else []


def _hf_chat_template(directory: pathlib.Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over the config, as in transformers; of named templates we take 'default'."""
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def _export_hf(directory: pathlib.Path) -> _Exported:
    if not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{directory}: missing {TOKENIZER_FILE}")
    backend = load_backend(directory / TOKENIZER_FILE)
    config = _read_optional_json(directory / TOKENIZER_CONFIG_FILE)
    special_tokens = special_tokens_of(config)
    eos_ids = [special_token_id(backend, special_tokens, "eos_token")]
    for name in ("generation_config.json", "config.json"):
        eos_ids += _id_list(_read_optional_json(directory / name).get("eos_token_id"))
    return _Exported(
        backend=backend,
        special_tokens=special_tokens,
        eos_token_ids=_unique_ids(eos_ids, backend.get_vocab_size(with_added_tokens=True)),
        chat_template=_hf_chat_template(directory, config),
    )


def _unique_ids(ids: list[int | None], vocab_size: int) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None and 0 <= i < vocab_size))


def _bos_post_processor(bos_token: str, bos_token_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0",
        pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
        special_tokens=[(bos_token, bos_token_id)],
    )


def _add_named_special_tokens(backend: tokenizers.Tokenizer, special_tokens: dict[str, str]) -> None:
    """Make bos/eos/... special added tokens (matched whole, skippable in decode), as transformers does
    with the ones the tokenizer does not already have."""
    known = {token.content for token in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text in special_tokens.values() if text not in known]
    )


def _check_chat_template(template: str | None, source: pathlib.Path) -> None:
    if template is None:
        return
    try:
        compile_chat_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"{source}: chat template does not compile ({one_line(exc)})") from exc


def _tokenizer_config(exported: _Exported, add_bos: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers then uses tokenizer.json as written
        **exported.special_tokens,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        EXTRA_KEY: {"eos_token_ids": exported.eos_token_ids},
    }
    if exported.chat_template is not None:
        config["chat_template"] = exported.chat_template
    return config


def export_tokenizer(source: pathlib.Path, out_dir: pathlib.Path) -> TokenizerInfo:
    """Write `tokenizer.json` and `tokenizer_config.json` for a GGUF file or a Hugging Face checkpoint directory."""
    source = pathlib.Path(source)
    if source.is_dir():
        exported = _export_hf(source)
    elif source.is_file():
        exported = _export_gguf(source)
    else:
        raise CheckpointError(f"{source}: no such file or directory")
    _check_chat_template(exported.chat_template, source)
    backend = exported.backend
    _add_named_special_tokens(backend, exported.special_tokens)
    bos_id = special_token_id(backend, exported.special_tokens, "bos_token")
    add_bos = post_processor_adds_bos(backend, bos_id)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / TOKENIZER_FILE))
    config = _tokenizer_config(exported, add_bos)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return TokenizerInfo(
        bos_token_id=bos_id,
        eos_token_ids=exported.eos_token_ids,
        add_bos_token=add_bos,
        chat_template=exported.chat_template,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
    )
