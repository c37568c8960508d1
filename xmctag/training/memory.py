"""Train's memory estimate: the peak memory a run will need, from the sizes of its inputs, checked before any long
work, so that a run that cannot fit stops at once with the setting to change instead of failing hours later.

``estimate_memory`` sums, in bytes, what lives through the whole run (the Python process with its libraries, the
texts and token ids, the product, dev and label embeddings) and adds the largest of the stages' own needs, which
follow each other and free their memory in between:

- fine-tuning (dual-encoder and classifier epochs): the encoder's weights with gradients and AdamW moments, the
  activations of a batch of products and of labels; the classifier head and its moments (all labels), and its
  logits (all labels, or a shortlist: ``xmctag.training.shortlist``);
- label vectors: label embeddings, residuals and Adam moments of the seen labels, a batch's logits over all of
  them (or the shortlists of every product and their search index);
- the lexical model: the TF-IDF matrix of the training texts, its vocabularies, and the label trees' training
  (measured: about ``LEXICAL_TREE_FACTOR`` times the matrix);
- dev evaluation and the neighbour search: one score block (``evaluator.SEARCH_BYTES``) and the candidates.

Each term is a formula of counts (products, labels, dimensions, tokens), sized on measured runs (bench/RESULTS.md,
"Training at 131K labels"): an estimate, meant to catch runs off by a factor, not to predict the peak to the GiB.
With ``--device cuda`` the fine-tuning and label-vector terms are checked against the GPU's free memory instead.
"""

from __future__ import annotations

from pathlib import Path

from xmctag.config import Config
from xmctag.errors import UserError

GiB = 2**30
BASE = 1.2 * GiB  # Python, torch, transformers, polars, faiss, omikuji loaded
BYTES_PER_CHAR = 1.2  # a Python str per text: ~50 bytes of header, 1 byte per ASCII character
BYTES_PER_TOKEN = 36  # a token id in a Python list: the pointer and the int object
CHARS_PER_TOKEN = 4.0  # word-piece tokens of product titles
ACTIVATION_FLOATS = 18  # saved activations per token, layer and hidden unit in a transformer's backward pass
TFIDF_NNZ_PER_CHAR = 3.4  # stored TF-IDF entries per text character (char_wb 2-5 grams + word 1-2 grams)
LEXICAL_TREE_FACTOR = 9.0  # omikuji's training peak over the TF-IDF matrix it trains on (131K synthetic run)


def available_memory() -> float:
    """Bytes this process may still use: the kernel's MemAvailable, or a smaller cgroup limit."""
    available = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:
                available = min(available, int(limit) - int(Path(usage_file).read_text().strip()))
        except OSError:
            continue
    return available


def estimate_memory(config: Config, n_train: int, n_dev: int, n_labels: int, n_seen: int, chars: int, dim: int,
                    n_params: int, layers: int, heads: int, cuda: bool = False) -> dict[str, dict[str, float]]:
    """``{"host": {part: bytes}, "gpu": {part: bytes}}`` (``gpu`` empty on the CPU); ``chars``: characters of all
    product and label texts; the model's embedding ``dim``, parameters, transformer ``layers`` and ``heads``."""
    from xmctag.evaluation.evaluator import SEARCH_BYTES

    items = n_train + n_dev + n_labels
    tokens = min(chars / CHARS_PER_TOKEN, items * config.max_length)
    batch_tokens = config.batch_size * min(config.max_length, max(8.0, 2.0 * tokens / max(1, items)))
    label_tokens = config.batch_size * min(config.label_max_length, 16)
    float_ = 4
    fine_tuning = (4 * n_params * float_  # weights, gradients, AdamW moments
                   + (batch_tokens + label_tokens) * layers * (ACTIVATION_FLOATS * dim + 2 * heads
                                                               * min(config.max_length, 64)) * float_)
    shortlisted = n_labels > config.label_shortlist_above
    per_batch = config.label_shortlist + config.label_random_negatives + 16 if shortlisted else n_labels
    classifier = 4 * n_labels * (dim + 1) * float_ + 4 * config.batch_size * per_batch * float_
    seen_shortlisted = n_seen > config.label_shortlist_above
    label_vectors = (4 * n_seen * (dim + 1) * float_
                     + (n_train * config.label_shortlist * 8 + n_seen * (dim + 1) * float_ if seen_shortlisted
                        else 4 * 512 * n_seen * float_))
    nnz = TFIDF_NNZ_PER_CHAR * chars * n_train / max(1, items)
    lexical = (0.0 if config.lexical == "none"
               else nnz * 12 * (1 + LEXICAL_TREE_FACTOR) + 2 * config.lexical_max_features * 60)
    search = SEARCH_BYTES + n_dev * (64 + config.knn_neighbours * 3 + config.lexical_candidates) * 40
    host = {
        "libraries": BASE,
        "texts and token ids": chars * BYTES_PER_CHAR + items * 100 + tokens * BYTES_PER_TOKEN,
        "embeddings": (3 * n_train + 2 * n_dev + 3 * n_labels) * dim * float_,
    }
    gpu: dict[str, float] = {}
    stages = {"fine-tuning": fine_tuning + (classifier if config.classifier_epochs != 0 else 0.0),
              "label vectors": label_vectors, "lexical model": lexical, "dev evaluation": search}
    if cuda:  # the two stages follow each other on the GPU: the larger counts
        on_gpu = {"fine-tuning": stages.pop("fine-tuning"), "label vectors": stages.pop("label vectors")}
        larger = max(on_gpu, key=on_gpu.get)
        gpu = {"CUDA context": 0.5 * GiB, larger: on_gpu[larger]}
    largest = max(stages, key=stages.get)
    host[largest] = stages[largest]
    return {"host": host, "gpu": gpu}


def check_memory(estimate: dict[str, dict[str, float]], config: Config, show, gpu_free: float | None = None) -> None:
    """Logs the estimate; a ``UserError`` naming its largest part when it is above what is available (or
    ``max_memory_gb``)."""
    host = sum(estimate["host"].values())
    limit = config.max_memory_gb * GiB if config.max_memory_gb else available_memory()
    checks = [("memory", host, limit, estimate["host"])]
    if estimate["gpu"] and gpu_free is not None:
        checks.append(("GPU memory", sum(estimate["gpu"].values()), gpu_free, estimate["gpu"]))
    for what, need, have, parts in checks:
        largest = max(parts, key=parts.get)
        show.log(f"{what}: estimated peak {need / GiB:.1f} GiB of {have / GiB:.1f} GiB available (largest: {largest} "
                 f"{parts[largest] / GiB:.1f} GiB)")
        if need > have:
            raise UserError(
                f"train: estimated peak {what} {need / GiB:.1f} GiB is more than the {have / GiB:.1f} GiB available "
                f"(largest part: {largest}, {parts[largest] / GiB:.1f} GiB); {_advice(largest)}, or set "
                "max_memory_gb (--config) if the estimate is wrong for this machine")


def _advice(part: str) -> str:
    return {
        "lexical model": "train with --lexical none or a smaller lexical_max_features",
        "fine-tuning": "lower --batch-size or --max-length, or set label_shortlist_above lower",
        "label vectors": "set label_shortlist_above lower",
        "texts and token ids": "train on fewer rows",
        "embeddings": "train on fewer rows",
        "dev evaluation": "use a smaller --dev",
    }.get(part, "train on fewer rows")
