"""DeepSeek's routers (transformers' DeepseekV2TopkRouter and DeepseekV3TopkRouter), for `MoeModel.route`.

Scores are a softmax (V2) or sigmoids (V3) of the float32 logits. With group scoring the experts form
`n_group` equal groups and only the `topk_group` groups ranked highest may be chosen: by their best score
("max", V2's group_limited_greedy; the others' scores become 0) or by the sum of their best two scores plus
correction bias ("top2", V3's noaux_tc; the others' become -inf). Selection is on the scores plus V3's
`e_score_correction_bias`; the weights are the plain scores of the chosen experts, renormalised when
`norm_topk_prob` (sum + 1e-20), times `routed_scaling_factor`."""

from __future__ import annotations

import torch

from moepack.arch import ModelSpec


def grouped_topk(logits: torch.Tensor, spec: ModelSpec,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (topk_ids [N, k], topk_weights [N, k] float32), each token's experts ordered by
    weight, largest first (the order big-little's little set is taken from)."""
    logits = logits.float()
    scores = logits.sigmoid() if spec.router_scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias
    if spec.group_scoring is not None and spec.n_group > 1:
        grouped = choice.view(choice.shape[0], spec.n_group, -1)  # [N, G, E/G]
        if spec.group_scoring == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        chosen = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        keep = keep[:, :, None].expand_as(grouped).reshape(choice.shape)
        choice = choice.masked_fill(~keep, 0.0 if spec.group_scoring == "max" else float("-inf"))
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * spec.routed_scaling_factor
    weights, order = weights.sort(dim=-1, descending=True)
    return ids.gather(1, order), weights
