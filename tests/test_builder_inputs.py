"""The builder's handling of what it is given: caching, and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.builder.checkpoint import load_checkpoint
from edge_runtime.cli import main
from edge_runtime.errors import CheckpointError
from edge_runtime.manifest import read_manifest


def test_build_writes_manifest_and_is_idempotent(tiny_checkpoints, tmp_path):
    ckpt, _ = tiny_checkpoints["llama"]
    out = build(ckpt, tmp_path / "m", BuildOptions(), quiet=True)
    manifest = read_manifest(out)
    assert manifest["spec"]["arch"] == "llama"
    assert manifest["quantization"] == "nbits"
    assert manifest["tokenizer"]["eos_token_ids"]
    assert len(manifest["source_sha256"]) == 64
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    stamp = (out / "model.onnx.data").stat().st_mtime_ns
    build(ckpt, out, BuildOptions(), quiet=True)
    assert (out / "model.onnx.data").stat().st_mtime_ns == stamp  # cached: not rebuilt


def test_changed_source_or_options_rebuild(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["glm"][0], src)
    out = build(src, tmp_path / "m", BuildOptions(), quiet=True)
    first = read_manifest(out)["source_sha256"]
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(config))
    build(src, out, BuildOptions(), quiet=True)
    assert read_manifest(out)["source_sha256"] != first
    build(src, out, BuildOptions(quant="fp32"), quiet=True)
    assert read_manifest(out)["quantization"] == "fp32"


def _expect_error(path, *fragments, arch=None):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(b"\x00\x01garbage" * 1000)
    _expect_error(bad, str(bad), "not a valid GGUF")


def test_truncated_gguf(tmp_path, smollm_gguf):
    cut = tmp_path / "cut.gguf"
    with smollm_gguf.open("rb") as f:
        cut.write_bytes(f.read(3_000_000))
    _expect_error(cut, str(cut))


def test_truncated_safetensors(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["llama"][0], src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _expect_error(src, str(weights), "truncated")


def test_corrupt_safetensors_header(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["llama"][0], src)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    _expect_error(src, "model.safetensors", "corrupt")


def test_unknown_architecture(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["llama"][0], src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    _expect_error(src, "config.json", "unsupported architecture 'gpt2'")


def test_wrong_arch_flag(tiny_checkpoints, smollm_gguf):
    _expect_error(tiny_checkpoints["llama"][0], "does not match --arch glm", arch="glm")
    _expect_error(smollm_gguf, "unsupported GGUF architecture 'llama' for --arch glm4", arch="glm4")


def test_missing_tensor(tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["glm"][0], src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor for 'l1.o'"):
        build(src, tmp_path / "out", BuildOptions(), quiet=True)
    assert not (tmp_path / "out").exists()  # nothing half-built left behind


def test_cli_build_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    assert main(["build", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-runtime: error: ") and err.count("\n") == 1
