"""training/batching: balanced clusters and the batches built from them."""

import numpy as np

from xmctag.training.batching import balanced_clusters, batches_from_clusters


def test_balanced_clusters_partition_and_group_similar_items():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:2] * 10
    x = np.vstack([centres[i % 2] + rng.normal(size=8) for i in range(200)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clusters = balanced_clusters(x, cluster_size=16, rng=rng)
    flat = np.concatenate(clusters)
    assert sorted(flat.tolist()) == list(range(200))
    assert all(8 <= len(c) <= 16 for c in clusters)
    assert all(len({i % 2 for i in c}) == 1 for c in clusters)  # no cluster mixes the two groups
    batches = batches_from_clusters(clusters, 32, rng)
    assert sum(len(b) for b in batches) == 200 and max(len(b) for b in batches) == 32
