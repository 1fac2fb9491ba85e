"""Model builder: checkpoint (GGUF or Hugging Face safetensors) -> INT8 ONNX decoder."""
