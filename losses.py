"""Contrastive losses with masked hard negatives (SPEC.md section 4). Depends on torch only;
each function can be copied on its own.

    info_nce(q, k, queue, hard_negatives, temperature=0.2, alpha=2.0)   # MoCo v2
    nt_xent(z1, z2, temperature=0.2, hard_negatives=None, alpha=1.0)    # SimCLR
    byol_loss(p, z)                                                     # BYOL

Embeddings are L2-normalised inside. Hard-negative logits are `alpha * q . t_m / tau`,
appended after the ordinary negatives; `alpha > 1` up-weights them. Similarities and logits
are computed in float32 at least, autocast or not: in bf16 a cosine near 1 carries about
+-0.004 of rounding, +-0.04 once scaled by alpha 2 / tau 0.2, as much as the gaps learning
reads.
"""
import contextlib

import torch
import torch.nn.functional as F


def l2norm(x):
    """Unit rows, in float32 at least: half precision is raised, float64 kept."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1)


def full_precision(x):
    """Inside, autocast is off on `x`'s device, so products of l2norm'ed (float32) rows stay float32."""
    return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
        else contextlib.nullcontext()


def hard_negative_logits(anchors, hard_negatives, alpha):
    """`alpha * a . t_m` for each anchor (unit rows, as l2norm gives) and its own M hard negatives:
    `[B, D], [B, M, D] -> [B, M]`, in float32 at least.

    Hard negatives carry no gradient (they come from the momentum encoder, or a no_grad pass).
    """
    with full_precision(anchors):
        return alpha * torch.einsum("bd,bmd->bm", anchors, l2norm(hard_negatives.detach()))


def info_nce(q, k, queue=None, hard_negatives=None, temperature=0.2, alpha=1.0):
    """MoCo InfoNCE: `logits = [q.k, q.queue^T, alpha q.t_1 .. alpha q.t_M] / tau`, target 0.

    q, k: [B, D]; queue: [K, D] or None (then a row holds the positive and the hard negatives
    only); hard_negatives: [B, M, D] or None. Gradient flows into q (and k if it has one),
    never into the queue or the hard negatives.
    """
    q, k = l2norm(q), l2norm(k)
    with full_precision(q):
        logits = [(q * k).sum(1, keepdim=True)]                      # positive: [B, 1]
        if queue is not None:
            logits.append(q @ l2norm(queue.detach()).T)              # negatives: [B, K]
        if hard_negatives is not None:
            logits.append(hard_negative_logits(q, hard_negatives, alpha))   # hard negatives: [B, M]
        logits = torch.cat(logits, dim=1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


def nt_xent(z1, z2, temperature=0.2, hard_negatives=None, alpha=1.0):
    """SimCLR's NT-Xent over the 2B views, with hard-negative logits appended.

    z1, z2: [B, D], two views of B images. Each of the 2B anchors is contrasted with the other
    2B - 1 views (its own similarity excluded); its positive is the other view of its image.
    hard_negatives: [B, M, D] (shared by both views of an image) or [2B, M, D] (one set per
    anchor, rows ordered as `cat([z1, z2])`); each anchor's row gains M logits.
    """
    B = len(z1)
    z = l2norm(torch.cat([z1, z2]))                                  # [2B, D]
    with full_precision(z):
        sim = z @ z.T                                                # [2B, 2B]
        self_mask = torch.eye(2 * B, dtype=torch.bool, device=z.device)
        logits = [sim.masked_fill(self_mask, float("-inf"))]
        if hard_negatives is not None:
            if len(hard_negatives) == B:
                hard_negatives = torch.cat([hard_negatives, hard_negatives])
            logits.append(hard_negative_logits(z, hard_negatives, alpha))   # [2B, M]
        logits = torch.cat(logits, dim=1) / temperature
    positives = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(logits, positives)


def byol_loss(p, z):
    """BYOL regression loss `2 - 2 cos(p, z)`, mean over the batch. `z` is the target: no gradient."""
    return (2 - 2 * (l2norm(p) * l2norm(z.detach())).sum(-1)).mean()
