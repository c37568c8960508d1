"""Second stage: per-label vectors learned on frozen product embeddings (NGAME classifiers / PRIME prototypes).

The dual encoder alone scores a product q against a label by <q, e_l>, e_l the embedding of the label's text.
Frequent labels are better served by a vector fitted to the products that carry them, so each label gets

    logit(q, l) = scale * (<q, w_l> + b_l),   w_l = a * e_l + r_l,   b_l = c + d_l

trained with one-vs-all binary cross-entropy over all labels seen in training. ``a`` and ``c`` are fitted
first with r = d = 0 (a two-parameter calibration of the text scores), then frozen; ``r_l``, ``d_l`` start at 0,
so every label starts from its text embedding, and an L2 penalty keeps rarely seen labels near it. Labels
never seen in training keep ``w_l = a * e_l``, ``b_l = c``: still rankable zero-shot, on the same scale.

``sigmoid(logit)`` is the score xmctag reports: a calibrated probability-like value in (0, 1).
"""

from __future__ import annotations

import numpy as np

from xmctag.scoring.label_vectors import LabelVectors

CALIBRATION_STEPS = 200


def fit_label_vectors(
    products: np.ndarray,
    product_labels: list[np.ndarray],
    label_embeddings: np.ndarray,
    scale: float = 20.0,
    epochs: int = 20,
    lr: float = 2e-3,
    l2: float = 1e-4,
    batch_size: int = 512,
    seed: int = 0,
    device="cpu",
    progress=None,
    shortlist_above: int | None = None,
    shortlist_size: int = 32,
    random_negatives: int = 512,
    shortlist_batch_size: int = 4096,
) -> LabelVectors:
    """Fits the label vectors; ``products`` ``(n, d)`` unit-norm, ``product_labels[i]`` label indices of row i.

    Over all seen labels per batch up to ``shortlist_above`` seen labels (None: always), over a ``Shortlist``
    (``shortlist_size`` hard negatives per product, ``random_negatives`` per batch) above it: then only the rows of
    ``r``, ``d`` a step touches are updated (``RowAdam``) and penalised, in batches of ``shortlist_batch_size``
    (each label still gets an update per batch that holds one of its products: a rare label as many per epoch as
    with small batches, while the steps' fixed costs are shared by more products)."""
    import torch  # here, not at the top: tagging uses LabelVectors and must not load torch

    from xmctag.training.shortlist import LabelLists, RowAdam, Shortlist, batch_targets, sampled_bce

    generator = torch.Generator().manual_seed(seed)
    seen = np.unique(np.concatenate(product_labels))
    column_of = np.full(len(label_embeddings), -1, dtype=np.int64)
    column_of[seen] = np.arange(len(seen))
    x = torch.from_numpy(products).float().to(device)
    e = torch.from_numpy(label_embeddings[seen]).float().to(device)
    dim = e.shape[1]
    lists = LabelLists.build(product_labels, column_of, device)
    sparse = shortlist_above is not None and len(seen) > shortlist_above
    shortlist = (Shortlist.build(products, label_embeddings[seen], lists, shortlist_size, random_negatives, seed,
                                 device) if sparse else None)

    a = torch.ones((), device=device, requires_grad=True)
    c = torch.zeros((), device=device, requires_grad=True)
    if sparse:  # one table of rows [r_l, d_l], updated row by row (RowAdam)
        table = torch.zeros(len(seen), dim + 1, device=device)
        r, d = table[:, :dim], table[:, dim:]
    else:
        r = torch.zeros_like(e, requires_grad=True)
        d = torch.zeros(len(seen), 1, device=device, requires_grad=True)
    row_optimizer = RowAdam(table, lr) if sparse else None  # the shortlist's optimiser of the residuals

    def dense_loss(idx, residual, penalty):
        r_, d_ = (r, d) if residual else (r.detach(), d.detach())
        logits = scale * (x[idx] @ (a * e + r_).T + c + d_[:, 0])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch_targets(lists, idx, len(seen)), reduction="sum") / len(idx)
        if penalty:
            loss = loss + l2 * (r.square().sum() + d.square().sum())
        return loss

    def shortlist_loss(idx, residual, penalty):
        batch = shortlist.candidates(idx)
        columns = batch.columns.clamp(min=0)  # (B, C); -1 (none) weighs 0
        touched, inverse = torch.unique(torch.cat([columns.flatten(), batch.random]), return_inverse=True)
        rows = row_optimizer.rows(touched) if residual else table[touched]  # (U, dim + 1)
        w, b = a * e[touched] + rows[:, :dim], c + rows[:, dim]
        at, random_at = inverse[:columns.numel()].view(columns.shape), inverse[columns.numel():]
        q = x[idx]
        # embedding(at, w), not w[at]: its backward adds rows up (index_add) instead of an accumulating index_put
        logits = scale * ((torch.nn.functional.embedding(at, w) * q[:, None, :]).sum(-1) + b[at])
        random_logits = scale * (q @ w[random_at].T + b[random_at])
        loss = sampled_bce(logits, random_logits, batch)
        if penalty:  # the rows this step touches
            loss = loss + l2 * rows.square().sum()
        return loss

    loss_of = shortlist_loss if sparse else dense_loss
    steps_per_epoch = -(-len(products) // (shortlist_batch_size if sparse else batch_size))

    def run(params, steps, step_lr, residual, report):
        optimizer = row_optimizer if sparse and residual else torch.optim.Adam(params, lr=step_lr)
        size = shortlist_batch_size if sparse and residual else batch_size  # calibration: small batches
        per_epoch = -(-len(products) // size)
        order = torch.randperm(len(products), generator=generator).to(device)
        for step in range(steps):
            start = (step % per_epoch) * size
            if start == 0 and step:  # a new epoch: a new order
                order = torch.randperm(len(products), generator=generator).to(device)
            idx = order[start:start + size]
            loss = loss_of(idx, residual, penalty=residual)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if report and progress is not None and (step + 1) % per_epoch == 0:
                progress(1)

    # Calibration of the text scores, shared by all labels: a 2-parameter logistic regression, so a fixed number
    # of steps with a large learning rate, whatever the data size.
    run([a, c], CALIBRATION_STEPS, 0.05, residual=False, report=False)
    a.requires_grad_(False)
    c.requires_grad_(False)
    run([r, d], epochs * steps_per_epoch, lr, residual=True, report=True)

    with torch.no_grad():
        a_, c_ = float(a), float(c)
        vectors = a_ * label_embeddings.astype(np.float32)
        bias = np.full(len(label_embeddings), c_, dtype=np.float32)
        vectors[seen] += r.detach().cpu().numpy()
        bias[seen] += d[:, 0].detach().cpu().numpy()
    return LabelVectors(vectors.astype(np.float32), bias, scale)
