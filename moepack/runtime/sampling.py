"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [V] -> token id."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.double()  # float64 also holds temperatures far below float32's range
    # shifted so the largest is 0: a tiny temperature sends the others to -inf, never to inf - inf = NaN
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStream:
    """Incremental detokenisation: yields the new text each token adds, never splitting a UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new
