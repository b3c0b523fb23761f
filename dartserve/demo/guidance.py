"""Two training signals that teach the demo model's language model where to look.

Answering "what colour is the cross?" takes two steps: the token that predicts the answer
gathers the question's words, then looks for the vision tokens that show what they name. The
answer word alone rewards the two only once both work, so a model trained from scratch sits at
the answer priors for thousands of steps (a model fed perfect symbolic object tokens did too).
Each step gets a signal of its own here:

- a probe on the asking token after layer ``GUIDED_LAYER - 1`` names the shapes and colours the
  question mentions;
- at layer ``GUIDED_LAYER`` the asking token's attention is pulled to the objects the question
  names: head 0 to the first (every object, for a count), head 1 to the second;
- in phase four, the values those two heads take from each vision token show its place, and
  the asking token after that layer names where the named objects lie (``PlaceProbe``). The
  vision tokens knew their place, yet with the first two signals alone the heads carried what
  the objects are, not where, and position questions stayed at chance.

All are used in training only.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dartserve.demo.data import COLOURS, SHAPES, SIZE, Example, named_roles

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


class PlaceProbe(torch.nn.Module):
    """Where things lie, for the position questions. Two parts:

    - the values that heads 0 and 1 of layer ``GUIDED_LAYER`` take from each vision token show
      its place, read along two directions of unit length. The vision tokens knew their place
      all along, but those values carried little of it, and a probe on the asking token alone
      did not teach the heads to carry it;
    - the asking token after that layer names where the objects the question names lie: what
      the two heads gathered.
    """

    def __init__(self, head_dim: int, width: int) -> None:
        super().__init__()
        self.marks = torch.nn.Parameter(torch.randn(2, 2, head_dim))  # per head: column, row
        self.named = torch.nn.Linear(width, 4)

    def loss(self, values: torch.Tensor, places: torch.Tensor, hidden: torch.Tensor, examples: list[Example]) -> torch.Tensor:
        """``values`` ``[vision tokens, 2, head_dim]``: the two heads' values of every vision
        token in the batch; ``places`` ``[vision tokens, 2]`` each one's column and row in
        [-1, 1]; ``hidden`` ``[batch, width]`` the asking tokens after the layer."""
        marks = torch.einsum("nhd,hcd->nhc", values, torch.nn.functional.normalize(self.marks, dim=-1))
        loss = torch.nn.functional.mse_loss(marks, places[:, None].expand_as(marks))
        targets, known = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4, dtype=torch.bool)
        for row, e in enumerate(examples):
            roles = named_roles(e)
            for role in (1, 2):
                named = [o for o, r in zip(e.objects, roles) if r == role]
                # A count names every object, so it has no one place.
                if e.question_type != "count" and len(named) == 1:
                    columns = slice(2 * role - 2, 2 * role)
                    targets[row, columns] = torch.tensor([named[0].x, named[0].y]) / SIZE * 2 - 1
                    known[row, columns] = True
        if bool(known.any()):
            loss = loss + torch.nn.functional.mse_loss(self.named(hidden)[known], targets[known])
        return loss


def guided_values(model, hidden: torch.Tensor) -> torch.Tensor:
    """The values heads 0 and 1 of layer ``GUIDED_LAYER`` take from each token, ``[batch,
    tokens, 2, head_dim]``, from the layer's input ``hidden``."""
    layer = model.model.language_model.layers[GUIDED_LAYER]
    head_dim = layer.self_attn.head_dim
    values = layer.self_attn.v_proj(layer.input_layernorm(hidden))
    return values[..., : 2 * head_dim].unflatten(-1, (2, head_dim))


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
