"""edge_runtime: the engine. Builds INT8 ONNX decoders from GGUF / Hugging Face checkpoints
and runs them with ONNX Runtime (TensorRT on NVIDIA GPUs)."""

__version__ = "0.1.0"
