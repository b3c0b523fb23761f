"""Training signals that teach the demo model's language model where to look.

Answering "what colour is the cross?" takes two steps: the token that predicts the answer
gathers the question's words, then looks for the vision tokens that show what they name. The
answer word alone rewards the two only once both work, so a model trained from scratch sits at
the answer priors for thousands of steps (a model fed perfect symbolic object tokens did too).
Each step gets a signal of its own here:

- a probe on the asking token after layer ``GUIDED_LAYER - 1`` names the shapes and colours the
  question mentions (``QuestionProbe``);
- at layer ``GUIDED_LAYER`` attention is pulled to the objects a token needs: from a question's
  asking token, head 0 to the first object the question names (every object, for a count) and
  head 1 to the second; in a description, head 0 of each token to the object whose words it
  predicts, so that the sentence walks through the objects in reading order;
- after that layer, the token names what each head found: the object's shape, colour, cell and
  centre (``FoundProbe``), so that what the heads gather reaches the tokens that answer;
- the values those two heads take from each vision token show its place (``PlaceProbe``). The
  vision tokens know their place, yet without it the heads carried what the objects are, not
  where, and position questions stayed at chance.

All are used in training only.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dartserve.demo.data import COLOURS, NUMBERS, PLACES, SHAPES

GUIDED_LAYER = 2
GUIDED_HEADS = 2
CELLS = len(PLACES)
MOST_OBJECTS = len(NUMBERS) - 1
WORDS = (*SHAPES, *COLOURS)


class QuestionProbe(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.words = torch.nn.Linear(width, len(WORDS))

    def loss(self, hidden: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """``hidden`` ``[questions, width]``: the asking tokens after layer ``GUIDED_LAYER - 1``."""
        named = torch.tensor([[float(w in q.split()) for w in WORDS] for q in questions])
        return torch.nn.functional.binary_cross_entropy_with_logits(self.words(hidden), named)


class PlaceProbe(torch.nn.Module):
    """The values that heads 0 and 1 of layer ``GUIDED_LAYER`` take from each vision token show
    its place, read along two directions of unit length per head."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.marks = torch.nn.Parameter(torch.randn(GUIDED_HEADS, 2, head_dim))  # per head: column, row

    def loss(self, values: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """``values`` ``[vision tokens, 2, head_dim]``: the two heads' values of every vision
        token in the batch; ``places`` ``[vision tokens, 2]`` each one's column and row in [-1, 1]."""
        marks = torch.einsum("nhd,hcd->nhc", values, torch.nn.functional.normalize(self.marks, dim=-1))
        return torch.nn.functional.mse_loss(marks, places[:, None].expand_as(marks))


class FoundProbe(torch.nn.Module):
    """What each guided head found, named by the token after layer ``GUIDED_LAYER``: how many
    objects; where that is one, its shape, colour and cell, and its centre."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.classes = (len(SHAPES), len(COLOURS), CELLS, MOST_OBJECTS + 1)
        self.names = torch.nn.Linear(width, GUIDED_HEADS * sum(self.classes))
        self.centre = torch.nn.Linear(width, GUIDED_HEADS * 2)

    def loss(self, hidden: torch.Tensor, found: torch.Tensor, centres: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[points, width]``; ``found`` ``[points, heads, 4]`` the shape, colour
        and cell class of the one object each head is to find (-1 where it is to find none,
        or several) and how many it is to find; ``centres`` ``[points, heads, 2]`` the one
        object's centre in [-1, 1]; ``weights`` ``[points]``."""
        logits = self.names(hidden).unflatten(-1, (GUIDED_HEADS, -1)).split(self.classes, dim=-1)
        weight = weights[:, None].expand(-1, GUIDED_HEADS)
        loss = (torch.nn.functional.cross_entropy(logits[-1].flatten(0, 1), found[..., -1].flatten(), reduction="none") * weight.flatten()).sum()
        one = found[..., 0] >= 0
        for k, names in enumerate(logits[:-1]):
            loss = loss + (torch.nn.functional.cross_entropy(names[one], found[..., k][one], reduction="none") * weight[one]).sum()
        distance = ((self.centre(hidden).unflatten(-1, (GUIDED_HEADS, 2)) - centres) ** 2).sum(-1)
        return (loss + (distance[one] * weight[one]).sum()) / weight.sum()


def guided_values(model, hidden: torch.Tensor) -> torch.Tensor:
    """The values heads 0 and 1 of layer ``GUIDED_LAYER`` take from each token, ``[batch,
    tokens, 2, head_dim]``, from the layer's input ``hidden``."""
    layer = model.model.language_model.layers[GUIDED_LAYER]
    head_dim = layer.self_attn.head_dim
    values = layer.self_attn.v_proj(layer.input_layernorm(hidden))
    return values[..., : GUIDED_HEADS * head_dim].unflatten(-1, (GUIDED_HEADS, head_dim))


def guided_attention_loss(
    model, hidden: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Minus the log of the attention that heads 0 and 1 of layer ``GUIDED_LAYER`` give, from
    token ``tokens[i]`` of row ``rows[i]``, to the tokens ``targets[i, head]`` (``[points, 2,
    tokens]``, bool) of the object that head is to find, averaged with the points' ``weights``;
    and that attention's mean share. ``hidden`` is the layer's input. A head with no target at
    a point adds nothing there."""
    language_model = model.model.language_model
    layer = language_model.layers[GUIDED_LAYER]
    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    dim = GUIDED_HEADS * attention.head_dim  # the guided heads' channels come first
    query = torch.nn.functional.linear(x, attention.q_proj.weight[:dim], None if attention.q_proj.bias is None else attention.q_proj.bias[:dim])
    key = torch.nn.functional.linear(x, attention.k_proj.weight[:dim], None if attention.k_proj.bias is None else attention.k_proj.bias[:dim])
    query = query.view(batch, length, GUIDED_HEADS, -1).transpose(1, 2)
    key = key.view(batch, length, GUIDED_HEADS, -1).transpose(1, 2)
    cos, sin = language_model.rotary_emb(x, positions)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    # Every row's scores at once ([batch, heads, tokens, tokens]) cost less than gathering each point's keys.
    scores = (query @ key.transpose(-1, -2) * attention.scaling)[rows, :, tokens]
    visible = torch.arange(length)[None] <= tokens[:, None]
    log_attention = scores.masked_fill(~visible[:, None], float("-inf")).log_softmax(dim=-1)
    found = targets.any(dim=-1)  # [points, heads]
    if not bool(found.any()):
        return hidden.new_zeros(()), 0.0
    log_share = log_attention.masked_fill(~targets, float("-inf")).logsumexp(dim=-1)[found]
    weight = weights[:, None].expand_as(found)[found]
    return -(log_share * weight).sum() / weight.sum(), float(log_share.detach().exp().mean())
