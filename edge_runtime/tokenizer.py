"""The engine's tokenizer: encode and decode with the files `export_tokenizer`
(edge_runtime/builder/tokenizer_export.py) writes, chat templates, and streaming detokenization.
The exported `tokenizer.json` (for the `tokenizers` library) and `tokenizer_config.json` are also
what transformers' `AutoTokenizer.from_pretrained(out_dir)` loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import threading
from typing import Any, TypeVar

import tokenizers
from tokenizers.decoders import DecodeStream

from edge_runtime.chat_template import render_chat_template
from edge_runtime.errors import CheckpointError, InvalidRequest

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Our own key in tokenizer_config.json: transformers keeps only one eos token there.
EXTRA_KEY = "edge_runtime"
# The named special tokens transformers hands to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Control tokens llama.cpp also stops on, whatever the file's eos id says.
END_OF_GENERATION_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>"}
)
# Placeholders (private-use characters) for special-token text found in message content: see shield().
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
T = TypeVar("T")


@dataclasses.dataclass
class TokenizerInfo:
    """What the engine needs to know about a tokenizer besides the tokenizer itself."""

    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerInfo:
        return cls(
            bos_token_id=data["bos_token_id"],
            eos_token_ids=[int(token_id) for token_id in data["eos_token_ids"]],
            add_bos_token=bool(data["add_bos_token"]),
            chat_template=data["chat_template"],
            vocab_size=int(data["vocab_size"]),
        )


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_backend(path: pathlib.Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: not a tokenizers file ({one_line(exc)})") from exc


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_tokens_of(config: dict[str, Any]) -> dict[str, str]:
    return {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name)))}


def special_token_id(backend: tokenizers.Tokenizer, special_tokens: dict[str, str], name: str) -> int | None:
    return backend.token_to_id(special_tokens[name]) if name in special_tokens else None


def post_processor_adds_bos(backend: tokenizers.Tokenizer, bos_token_id: int | None) -> bool:
    """Whether encoding adds the BOS. The tokenizer.json decides, not tokenizer_config.json's add_bos_token:
    transformers ignores that flag when there is a tokenizer.json."""
    ids = backend.encode("a", add_special_tokens=True).ids
    return bos_token_id is not None and ids[:1] == [bos_token_id]


def _bare_tokenizer_info(backend: tokenizers.Tokenizer) -> TokenizerInfo:
    added = backend.get_added_tokens_decoder()
    return TokenizerInfo(
        bos_token_id=None,
        eos_token_ids=sorted(i for i, t in added.items() if t.special and t.content in END_OF_GENERATION_TEXTS),
        add_bos_token=False,
        chat_template=None,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
    )


class Tokenizer:
    """Encodes prompts, decodes completions and renders chat templates for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        info: TokenizerInfo | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        """`special_tokens` (bos_token, eos_token, ... -> text) reach the chat template. Without `info`, as for a
        bare `tokenizers` object, there is no chat template and the stop tokens are recognised by name."""
        self._backend = backend
        self.info = info or _bare_tokenizer_info(backend)
        self.special_tokens_of = special_tokens or {}
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special}, key=len, reverse=True)
        # Longest first, so that a token containing another is taken whole; our own marker
        # character too, so that a user cannot forge a placeholder.
        self._special_text = re.compile("|".join(map(re.escape, [*specials, _MARK_OPEN])))
        self._plain_backend: tokenizers.Tokenizer | None = None
        self._plain_lock = threading.Lock()

    @classmethod
    def from_dir(cls, directory: pathlib.Path) -> Tokenizer:
        """Load what `export_tokenizer` wrote."""
        directory = pathlib.Path(directory)
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory}: missing {name}")
        backend = load_backend(directory / TOKENIZER_FILE)
        config = read_json(directory / TOKENIZER_CONFIG_FILE)
        special_tokens = special_tokens_of(config)
        bos_id = special_token_id(backend, special_tokens, "bos_token")
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = config.get(EXTRA_KEY, {}).get("eos_token_ids")
        if not isinstance(eos_ids, list):
            raise CheckpointError(f"{directory / TOKENIZER_CONFIG_FILE}: not written by export_tokenizer (no eos ids)")
        info = TokenizerInfo(
            bos_token_id=bos_id,
            eos_token_ids=[int(token_id) for token_id in eos_ids],
            add_bos_token=post_processor_adds_bos(backend, bos_id),
            chat_template=config.get("chat_template"),
            vocab_size=vocab_size,
        )
        return cls(backend, info, special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self.info.bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return self.info.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def chat_template(self) -> str | None:
        return self.info.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the BOS first when the model wants one (`add_bos_token`) and
        `add_special_tokens` is set; special tokens written in the text (like `<|im_start|>`) become their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def shield(self, value: T, literals: list[str]) -> T:
        """`value` (message dicts, lists, strings) with the text of every special token in its
        strings replaced by a placeholder, the text itself appended to `literals`: rendered by the
        template, then encoded by encode_rendered, it stays text and never becomes a control token.
        Placeholders, not escapes: the template still sees the content (trims, tests on it)
        otherwise unchanged, and the model still reads what the user typed."""
        if isinstance(value, str):
            def mark(match: re.Match[str]) -> str:
                literals.append(match.group())
                return f"{_MARK_OPEN}{len(literals) - 1}{_MARK_CLOSE}"

            return self._special_text.sub(mark, value)  # type: ignore[return-value]
        if isinstance(value, list):
            return [self.shield(v, literals) for v in value]  # type: ignore[return-value]
        if isinstance(value, dict):
            return {k: self.shield(v, literals) for k, v in value.items()}  # type: ignore[return-value]
        return value

    def encode_rendered(self, text: str, literals: list[str]) -> list[int]:
        """Token ids of a template's output whose content went through shield(): the template's
        own text with its special tokens parsed, each placeholder's text as plain text. Without
        placeholders it is exactly encode(text, add_special_tokens=False)."""
        if not literals:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        start = 0
        for match in _MARK.finditer(text):  # all ours: every marker character in the content was replaced
            if match.start() > start:
                ids += self.encode(text[start:match.start()], add_special_tokens=False)
            ids += self._plain().encode(literals[int(match.group(1))], add_special_tokens=False).ids
            start = match.end()
        if start < len(text):
            ids += self.encode(text[start:], add_special_tokens=False)
        return ids

    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special-token text as ordinary text."""
        with self._plain_lock:
            if self._plain_backend is None:
                plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
                plain.encode_special_tokens = True
                self._plain_backend = plain
            return self._plain_backend

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar engines build their token view from)."""
        return self._backend.to_str()

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; `kwargs` reach the template, overriding the special tokens."""
        if self.info.chat_template is None:
            raise InvalidRequest("messages", "this model has no chat template")
        context = {**self.special_tokens_of, **kwargs}
        return render_chat_template(
            self.info.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=context.pop("bos_token", None),
            eos_token=context.pop("eos_token", None),
            tools=tools,
            **context,
        )


class IncrementalDecoder:
    """Turns one stream of generated ids into text pieces, never splitting a multi-byte character.

    The `tokenizers` library's DecodeStream does the work in one native call per id (it decodes a
    small window and holds back text ending in an incomplete character, as text-generation-inference
    and vLLM do). The ids since the last piece are kept so that `flush` can end a stream cut
    mid-character the way `decode` would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._backend = tokenizer._backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._window: list[int] = []  # the ids of the last piece, then those not yet shown
        self._shown = 0  # how many of `_window` the pieces so far covered

    def push(self, token_id: int) -> str:
        """The text that `token_id` makes final ('' while a character is incomplete)."""
        self._window.append(token_id)
        piece = self._stream.step(self._backend, token_id)
        if piece is None:
            return ""
        self._window = self._window[self._shown :]
        self._shown = len(self._window)
        return piece

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (incomplete bytes come out as U+FFFD, like decode)."""
        decode = functools.partial(self._backend.decode, skip_special_tokens=self._skip_special_tokens)
        done, text = decode(self._window[: self._shown]), decode(self._window)
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        self._window, self._shown = [], 0
        return text[len(done) :]
