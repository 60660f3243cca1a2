"""A k-nearest-neighbour classifier on frozen features: how well an encoder's features separate the
classes without training anything on them (Wu et al. 2018; the monitor of DINO, Caron et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 bank: torch.Tensor | None = None, bank_labels: torch.Tensor | None = None,
                 chunk: int = 1024) -> float:
    """Share of `features` (N, D) whose class `labels` (N,) the k nearest `bank` features (M, D) vote for,
    neighbours by cosine similarity, each vote weighted exp(similarity / temperature). Without a bank,
    leave-one-out within `features`: each one is classified by the others. Samples labelled -1 (missing)
    neither vote nor count."""
    leave_one_out = bank is None
    if leave_one_out:
        bank, bank_labels = features, labels
    queries_labelled, bank_labelled = labels >= 0, bank_labels >= 0
    if leave_one_out:  # keep the two sides aligned, so each query can skip itself on the diagonal
        queries_labelled = bank_labelled = queries_labelled & bank_labelled
    queries = F.normalize(features[queries_labelled].float(), dim=1)  # (N', D)
    keys = F.normalize(bank[bank_labelled].float(), dim=1)  # (M', D)
    query_labels, key_labels = labels[queries_labelled], bank_labels[bank_labelled]
    neighbours = min(k, len(keys) - leave_one_out)
    if len(queries) == 0 or neighbours < 1:
        return float("nan")
    num_classes = int(max(query_labels.max(), key_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ keys.T  # (n, M')
        if leave_one_out:
            rows = torch.arange(similarity.shape[0], device=similarity.device)
            similarity[rows, start + rows] = float("-inf")
        top_similarity, top_index = similarity.topk(neighbours, dim=1)  # (n, k)
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, key_labels[top_index], (top_similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == query_labels[start:start + chunk]).sum())
    return correct / len(queries)
