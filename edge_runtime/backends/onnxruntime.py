"""ONNX Runtime backend: runs the built decoder with the KV cache on the session's device
(backends/kv_store.py: tensors that grow with the tokens held). Past and present are bound to
the same device memory, so GroupQueryAttention appends new keys/values in place: no step
copies the cache, and only token ids go in and logits come out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..builder.spec import ModelSpec
from ..errors import CheckpointError, ContextLengthExceeded
from ..manifest import read_manifest
from ..memory import release_free_heap
from .kv_store import KVStore
from .providers import CPU, DevicePlan

_KV_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


class OnnxRuntimeBackend:
    def __init__(
        self,
        model_dir: Path,
        max_batch: int = 8,
        max_context: int | None = None,
        threads: int | None = None,
        device: DevicePlan = CPU,  # providers.plan_device: explicit, checked before loading; the KV cache lives there too
    ) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        if manifest is None:
            raise CheckpointError(f"{model_dir}: not a built model (no readable manifest.json); run `edge-runtime build` first")
        self.manifest = manifest
        self.spec = ModelSpec.from_dict(manifest["spec"])
        self.max_batch = max_batch
        self.max_context = min(max_context or manifest["max_context"], manifest["max_context"])
        self.vocab_size = self.spec.vocab_size
        release_free_heap()  # what loading the tokenizer left behind: keeps peak RSS down
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = device.open_session(model_dir / manifest["model_file"], options)
        kv_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self.kv = KVStore(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, _KV_TYPES[kv_type],
                          self.max_context, device.device)
        self._lens = [0] * max_batch
        self._in_use = [False] * max_batch
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._bindings_generation = -1

    # -- slots --------------------------------------------------------------------------

    def allocate(self) -> int:
        slot = self.next_slot()
        self._in_use[slot] = True
        self._lens[slot] = 0
        return slot

    def next_slot(self) -> int:
        for slot, used in enumerate(self._in_use):  # lowest first keeps decode batches dense
            if not used:
                return slot
        raise RuntimeError("no free KV slot")

    def free(self, slot: int) -> None:
        self._in_use[slot] = False
        self._lens[slot] = 0
        used = [row for row, in_use in enumerate(self._in_use) if in_use]
        rows = used[-1] + 1 if used else 0
        self.kv.fit(rows, max((self._lens[row] + 1 for row in used), default=0))

    def seq_len(self, slot: int) -> int:
        return self._lens[slot]

    # -- KV state (prefix cache) ---------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token()

    def kv_bytes_allocated(self) -> int:
        return self.kv.bytes_allocated()

    def kv_bytes_if(self, rows: int, tokens: int) -> int:
        return self.kv.bytes_if(rows, tokens)

    def export_kv(self, slot: int, start: int, end: int) -> np.ndarray:
        return self.kv.export(slot, start, end)

    def import_kv(self, slot: int, kv: np.ndarray) -> None:
        start, n = self._lens[slot], kv.shape[3]
        if start + n > self.max_context:
            raise ContextLengthExceeded(start + n, self.max_context)
        self.kv.reserve(slot + 1, start + n)
        self.kv.write(slot, start, kv)
        self._lens[slot] = start + n

    # -- forward ------------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        start, n = self._lens[slot], ids.shape[1]
        if start + n > self.max_context:
            raise ContextLengthExceeded(start + n, self.max_context)
        self.kv.reserve(slot + 1, start + n)
        logits = self._run(slot, slot + 1, ids, np.array([start + n - 1], np.int32), np.array([n - 1]))
        self._lens[slot] = start + n
        return logits[0, 0]

    def prefill_logits(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        """Like prefill, but logits [S, vocab] for every position (parity checks, logprobs)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        start, n = self._lens[slot], ids.shape[1]
        if start + n > self.max_context:
            raise ContextLengthExceeded(start + n, self.max_context)
        self.kv.reserve(slot + 1, start + n)
        logits = self._run(slot, slot + 1, ids, np.array([start + n - 1], np.int32), np.arange(n))
        self._lens[slot] = start + n
        return logits[0]

    def decode(self, slots: list[int], token_ids: list[int]) -> np.ndarray:
        rows = max(slots) + 1
        ids = np.zeros((rows, 1), np.int64)
        # Rows not decoding this step run too (their batch rows must stay contiguous); they
        # write one scratch entry just past their valid length, which their next token overwrites.
        seqlens = np.minimum(np.array(self._lens[:rows], np.int32), self.max_context - 1)
        for slot, tok in zip(slots, token_ids):
            if self._lens[slot] >= self.max_context:
                raise ContextLengthExceeded(self._lens[slot] + 1, self.max_context)
            ids[slot, 0] = tok
        self.kv.reserve(rows, int(seqlens.max()) + 1)
        logits = self._run(0, rows, ids, seqlens, np.array([0]))
        for slot in slots:
            self._lens[slot] += 1
        return logits[slots, 0]

    def _run(self, first: int, end: int, ids: np.ndarray, seqlens_k: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        binding = self._binding(first, end)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", seqlens_k)
        binding.bind_cpu_input("total_sequence_length", np.array(int(seqlens_k.max()) + 1, np.int32))
        binding.bind_cpu_input("logits_index", logits_index.astype(np.int64))
        binding.bind_output("logits")  # to host memory, unallocated: its shape changes between runs
        self.session.run_with_iobinding(binding)
        # get_outputs()[0] is logits (bound first); copy_outputs_to_cpu would copy the KV too.
        return np.array(binding.get_outputs()[0].numpy(), copy=True)

    def _binding(self, first: int, end: int) -> ort.IOBinding:
        """An IO binding with the KV tensors' rows [first, end) bound as past and present (the
        same device memory), made once per row range and cache layout: rebinding 2 x layers
        tensors every step costs more than a small model's attention."""
        if self._bindings_generation != self.kv.generation:  # resized: the old addresses are gone
            self._bindings.clear()
            self._bindings_generation = self.kv.generation
        binding = self._bindings.get((first, end))
        if binding is None:
            binding = self.session.io_binding()
            binding.bind_output("logits")
            kv = self.kv
            shape, offset = kv.shape(end - first), first * kv.row_bytes()
            for i in range(kv.layers):
                k_ptr, v_ptr = kv.pointers(i)
                for name, ptr in ((f"past_key_values.{i}.key", k_ptr), (f"past_key_values.{i}.value", v_ptr)):
                    binding.bind_input(name, kv.device, 0, kv.dtype, shape, ptr + offset)
                for name, ptr in ((f"present.{i}.key", k_ptr), (f"present.{i}.value", v_ptr)):
                    binding.bind_output(name, kv.device, 0, kv.dtype, shape, ptr + offset)
            self._bindings[(first, end)] = binding
        return binding
