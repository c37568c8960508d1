"""Label search on a GPU through ONNX Runtime: chunked fp16 matrix products with top-k, no faiss-gpu and no torch.

faiss-gpu's wheels are built for CUDA 12, onnxruntime-gpu's for CUDA 13, and tagging never imports torch; ONNX
Runtime is already there and on the GPU, so the search is an ONNX graph of its own, built in memory at load (nothing
in the bundle changes, nothing is stored twice):

    queries float32 (n, d + 1) -> Cast fp16 -> MatMul with labels_t fp16 (d + 1, L) -> TopK(k) -> logits (Cast
    float32) (n, k), indices int64 (n, k)

``labels_t`` is the transposed ``label_vectors.npy`` in fp16, uploaded to the device once (an ``OrtValue``) and bound
to each run (``IOBinding``); queries go in chunks of ``QUERY_CHUNK`` (the (chunk, L) fp16 score matrix is the
memory cost: 1 GB at a million labels). fp16 scores can reorder near-ties, so ``Bundle.label_index`` wraps it in
``xmctag.backend.index.RefinedSearch``: twice the candidates, then their exact fp32 logits from
``label_vectors.npy``. The same graph runs on the CPU provider, which is how its results are tested without a GPU.

Used by ``Tagger.load(device="cuda")`` for label sets of ``xmctag.bundle.GPU_FROM`` labels and more (below that the
exact CPU search costs about a millisecond a product or less). Not yet run on a GPU: no GPU was available when it was
written (2026-12-03); its CPU-provider results are tested against exact search (tests/test_index.py).
"""

from __future__ import annotations

import numpy as np

QUERY_CHUNK = 512
OPSET = 17


def topk_graph() -> bytes:
    """The serialised ONNX model of the module docstring (dynamic n, d, L and k)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["queries"], ["queries_fp16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["queries_fp16", "labels_t"], ["scores"]),
             helper.make_node("TopK", ["scores", "k"], ["values", "indices"], axis=-1, largest=1, sorted=1),
             helper.make_node("Cast", ["values"], ["logits"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "xmctag_label_topk",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["n", "d"]),
         helper.make_tensor_value_info("labels_t", TensorProto.FLOAT16, ["d", "L"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "top"]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["n", "top"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()


class OnnxTopK:
    """``search(queries, k) -> (fp16-rounded logits, rows)`` over ``matrix`` ``(L, d + 1)`` on ``device``
    (``cuda`` or ``cpu``) with ONNX Runtime; ``ntotal``, ``d`` as a faiss index."""

    def __init__(self, matrix: np.ndarray, device: str = "cuda", threads: int | None = None):
        from xmctag.backend import runtime

        ort = runtime.onnxruntime()
        self.ntotal, self.d = matrix.shape
        self.device = device
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(topk_graph(), sess_options=options, providers=providers)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise runtime.CudaUnavailable("the GPU label search: ONNX Runtime could not start its CUDA provider")
        transposed = np.empty((self.d, self.ntotal), np.float16)
        for start in range(0, self.ntotal, 65536):  # a memory map is read once, in order, in bounded pieces
            transposed[:, start:start + 65536] = np.asarray(matrix[start:start + 65536], np.float32).T
        self.labels = ort.OrtValue.ortvalue_from_numpy(transposed, device, 0)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kept = min(k, self.ntotal)
        logits = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for start in range(0, len(queries), QUERY_CHUNK):
            binding = self.session.io_binding()
            binding.bind_cpu_input("queries", queries[start:start + QUERY_CHUNK])
            binding.bind_ortvalue_input("labels_t", self.labels)
            binding.bind_cpu_input("k", np.array([kept], np.int64))
            binding.bind_output("logits", "cpu")
            binding.bind_output("indices", "cpu")
            self.session.run_with_iobinding(binding)
            found, top = binding.copy_outputs_to_cpu()
            logits[start:start + QUERY_CHUNK, :kept], rows[start:start + QUERY_CHUNK, :kept] = found, top
        return logits, rows
