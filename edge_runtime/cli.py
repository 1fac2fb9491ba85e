"""`edge-runtime` command line: build, generate, chat, serve, and the subcommands other installed
packages add through the `edge_runtime.commands` entry points (the sidecar's `up`), which the
engine names but never imports."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import get_args

from edge_wire.settings import LOG_LEVELS, ConfigError

from .builder.build import DEFAULT_INT8_FORM, FLAVOURS, BuildOptions, build
from .builder.quantize import INT8_FORMS
from .builder.spec import ARCHITECTURES
from .config import DEVICES, KvDtype, load_config
from .errors import EdgeRuntimeError
from .sampling import SamplingParams

_SERVE_OVERRIDES = ("model", "socket_path", "max_batch", "max_context", "threads", "device", "queue_size", "kv_cache_mb",
                    "kv_dtype", "prefix_cache_mb", "grace_s", "log_level")

COMMANDS = "edge_runtime.commands"  # entry-point group of the subcommands other packages add


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="recipe name, built model directory, GGUF file or HF checkpoint directory (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-context", type=int, help="KV cache length (default: the model's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Edge LLM runtime: build and run INT8 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a GGUF file or HF checkpoint directory into an ONNX model directory")
    b.add_argument("source", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--quant", choices=("int8", "int4", "fp32"), default="int8")
    b.add_argument("--flavour", choices=tuple(FLAVOURS), default="ort",
                   help="ort: ONNX Runtime's fused operators (CPU); tensorrt: standard operators with Q/DQ INT8 (docs/jetson.md)")
    b.add_argument("--int8-form", choices=(*INT8_FORMS, "qdq"),
                   help=f"INT8 weight form (default: {DEFAULT_INT8_FORM} for ort; tensorrt takes only qdq)")
    b.add_argument("--kv-dtype", choices=get_args(KvDtype), default="fp32", help="KV cache element type (fp16: half the memory, slower on CPU)")
    b.add_argument("--arch", choices=ARCHITECTURES, help="expected architecture (default: read from the checkpoint)")
    b.add_argument("--max-context", type=int)

    g = sub.add_parser("generate", help="complete a text prompt (no chat template); prints only the generated text")
    g.add_argument("--prompt", required=True)
    _add_model_args(g)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template (end with Ctrl-D or /exit)")
    c.add_argument("--system", help="system message")
    _add_model_args(c)

    s = sub.add_parser("serve", help="run the engine daemon on a Unix socket (see docs/engine-protocol.md)")
    s.add_argument("--config", type=Path, help="TOML config file ([engine] table; default /etc/edge-runtime/config.toml if present)")
    s.add_argument("--model", help="recipe name, built model directory, GGUF file or HF checkpoint directory")
    s.add_argument("--socket", dest="socket_path", help="Unix socket path")
    s.add_argument("--max-batch", type=int)
    s.add_argument("--max-context", type=int)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", choices=DEVICES, help="cpu (default), cuda or tensorrt (docs/jetson.md)")
    s.add_argument("--queue-size", type=int)
    s.add_argument("--kv-cache-mb", type=float)
    s.add_argument("--kv-dtype", choices=get_args(KvDtype), help="KV cache element type of the model built for the engine")
    s.add_argument("--prefix-cache-mb", type=float)
    s.add_argument("--grace", dest="grace_s", type=float, help="seconds running streams may finish after SIGTERM")
    s.add_argument("--log-level", choices=LOG_LEVELS)

    for name, command in _commands().items():
        sub.add_parser(name, help=f"see `edge-runtime {name} --help` (from {command.module})", add_help=False)
    return parser


def _commands() -> dict[str, EntryPoint]:
    """Subcommands of other installed packages: `main(argv) -> exit status` callables."""
    return {command.name: command for command in entry_points(group=COMMANDS)}


def _serve(args: argparse.Namespace) -> int:
    from . import tracing
    from .server import serve

    overrides = {key: getattr(args, key) for key in _SERVE_OVERRIDES}
    config = load_config(args.config).with_overrides(**overrides)
    tracing.setup(tracing.load_tracing_config(args.config), "edge-runtime")
    try:
        return serve(config)
    finally:
        tracing.shutdown()  # exports the spans still buffered


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def _load(args: argparse.Namespace):
    from .engine import LocalModel
    from .models import resolve_model

    return LocalModel(resolve_model(args.model), max_context=args.max_context, threads=args.threads)


def _stream(chunks) -> str:
    parts = []
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        parts.append(chunk.text)
    return "".join(parts)


def _chat(args: argparse.Namespace) -> None:
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            reply = _stream(model.chat(messages, _sampling(args)))
        except EdgeRuntimeError as exc:  # e.g. the conversation outgrew the context: keep serving
            messages.pop()
            print(f"edge-runtime: {exc}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _commands().get(argv[0]) if argv else None
    if command is not None:
        try:
            run = command.load()
        except ModuleNotFoundError as exc:  # its package's extra is not installed
            dist = command.dist.name if command.dist is not None else "edge-runtime"
            print(f"edge-runtime: error: `{command.name}` needs {exc.name}, which this install lacks: "
                  f"pip install '{dist}[{','.join(command.extras) or 'all'}]'", file=sys.stderr)
            return 2
        return run(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            options = BuildOptions(quant=args.quant, int8_form=args.int8_form, arch=args.arch, max_context=args.max_context,
                                   flavour=args.flavour, kv_dtype=args.kv_dtype)
            print(build(args.source, args.output, options))
        elif args.command == "generate":
            _sampling(args)  # validate before loading the model
            _stream(_load(args).complete(args.prompt, _sampling(args)))
            print()
        elif args.command == "serve":
            return _serve(args)
        else:
            _chat(args)
    except (EdgeRuntimeError, ConfigError) as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
