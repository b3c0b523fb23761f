"""Two training signals that teach the demo model's language model where to look.

Answering "what colour is the cross?" takes two steps: the token that predicts the answer
gathers the question's words, then looks for the vision tokens that show what they name. The
answer word alone rewards the two only once both work, so a model trained from scratch sits at
the answer priors for thousands of steps (a model fed perfect symbolic object tokens did too).
Each step gets a signal of its own here:

- a probe on the asking token after layer ``GUIDED_LAYER - 1`` names the shapes and colours the
  question mentions;
- at layer ``GUIDED_LAYER`` the asking token's attention is pulled to the objects the question
  names: head 0 to the first (every object, for a count), head 1 to the second.

Both are used in training only.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dartserve.demo.data import COLOURS, SHAPES

GUIDED_LAYER = 2
WORDS = (*SHAPES, *COLOURS)


class QuestionProbe(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.words = torch.nn.Linear(width, len(WORDS))

    def loss(self, hidden: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """``hidden`` ``[batch, width]``: the asking tokens after layer ``GUIDED_LAYER - 1``."""
        named = torch.tensor([[float(w in q.split()) for w in WORDS] for q in questions])
        return torch.nn.functional.binary_cross_entropy_with_logits(self.words(hidden), named)


def guided_attention_loss(model, hidden: torch.Tensor, positions: torch.Tensor, asking: torch.Tensor, roles: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Minus the log of the attention that heads 0 and 1 of layer ``GUIDED_LAYER`` give, from
    each row's ``asking`` token, to the tokens of the object they are to find; and that
    attention's mean share. ``hidden`` is the layer's input, ``roles`` ``[batch, tokens]`` each
    token's object role (see ``named_roles``; 0 where it shows no named object). A row whose
    question names no object present (a "no" to "is there ...?") adds nothing."""
    language_model = model.model.language_model
    layer = language_model.layers[GUIDED_LAYER]
    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, tokens, _ = x.shape
    query = attention.q_proj(x).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(x).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
    cos, sin = language_model.rotary_emb(x, positions)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    rows = torch.arange(batch)
    scores = torch.einsum("bhd,bhtd->bht", query[rows, :, asking], key) * attention.scaling
    visible = torch.arange(tokens)[None] <= asking[:, None]
    log_attention = scores.masked_fill(~visible[:, None], float("-inf")).log_softmax(dim=-1)
    shares = []
    for head, role in ((0, 1), (1, 2)):
        target = roles == role
        found = target.any(dim=1)
        if bool(found.any()):
            shares.append(log_attention[:, head].masked_fill(~target, float("-inf")).logsumexp(dim=-1)[found])
    if not shares:
        return hidden.new_zeros(()), 0.0
    log_share = torch.cat(shares)
    return -log_share.mean(), float(log_share.detach().exp().mean())
