"""Attention guidance for training the demo model: a training-only loss, dropped afterwards.

A question word that names an object ("circle" in "what colour is the circle ?") should look
the object up among the vision tokens. Learnt from the answer loss alone, that lookup appears
far too slowly for a one-hour CPU budget, so one head at ``GUIDE_LAYER`` is taught to put its
attention on the named object's patches. The layer is the default pruning layer K = 2, the
first that runs on the kept tokens only: the lookup then happens where pruning matters, as it
does in real multimodal models whose answers need the image's details. A probe on the naming
word's output of that layer must then read the object's shape, colour and place, so that the
lookup carries what the answer needs and not just attention mass.
"""

from __future__ import annotations

import torch

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dartserve.demo.data import COLOURS, SHAPES, SIZE, Example, Shape, patch_objects

GUIDE_LAYER = 2
GUIDE_HEAD = 0


def named_objects(e: Example) -> list[tuple[str, Shape | None]]:
    """The question's words that name an object, each with that object (None: not in the image)."""
    by_shape = {o.shape: o for o in e.objects}
    by_colour = {o.colour: o for o in e.objects}
    words = e.question.split()
    if e.question_type in ("colour", "position"):  # "what colour is the circle", "is the circle left of the square"
        return [(w, by_shape[w]) for w in words if w in by_shape]
    if e.question_type in ("shape", "exists"):  # "what shape is the red object", "is there a red circle"
        # Shapes and colours are unique within an image, so the named colour's object alone decides "exists".
        colour = next(w for w in words if w in COLOURS)
        return [(colour, by_colour.get(colour))]
    return []


class AttentionGuide(torch.nn.Module):
    """Captures the guided layer's attention input and output during a forward pass and scores
    its lookups; its probe trains with the model and is dropped with it."""

    def __init__(self, model) -> None:
        super().__init__()
        layer = model.model.language_model.layers[GUIDE_LAYER]
        self.attention = [layer.self_attn]  # in a list: not a submodule, its weights are the model's
        self.probe = torch.nn.Linear(model.config.text_config.hidden_size, len(SHAPES) + 1 + len(COLOURS) + 1 + 2)
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.output: torch.Tensor | None = None
        layer.self_attn.register_forward_pre_hook(self._capture, with_kwargs=True)
        layer.register_forward_hook(self._capture_output)

    def _capture(self, module, args, kwargs) -> None:
        self.captured = (kwargs["hidden_states"], kwargs["position_embeddings"])

    def _capture_output(self, module, args, output) -> None:
        self.output = output[0] if isinstance(output, tuple) else output

    def loss(self, input_ids: torch.Tensor, image_token_id: int, word_ids: dict[str, int], examples: list[Example]) -> torch.Tensor:
        """Mean negative log of the attention mass each naming word puts on its object's patches."""
        hidden, (cos, sin) = self.captured
        attention = self.attention[0]
        dim = attention.head_dim
        head = slice(GUIDE_HEAD * dim, (GUIDE_HEAD + 1) * dim)
        queries = torch.nn.functional.linear(hidden, attention.q_proj.weight[head])[:, None]
        keys = torch.nn.functional.linear(hidden, attention.k_proj.weight[head])[:, None]
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        terms, probed, targets = [], [], []
        for row, e in enumerate(examples):
            image = (input_ids[row] == image_token_id).nonzero().flatten()
            under = patch_objects(e.objects)
            for word, target in named_objects(e):
                after = (input_ids[row, image[-1] + 1 :] == word_ids[word]).nonzero()
                position = int(image[-1]) + 1 + int(after[0])
                probed.append(self.output[row, position])
                targets.append(target)
                patches = [i for i, o in enumerate(under) if o is target] if target else []
                if not patches:
                    continue
                scores = keys[row, 0, : position + 1] @ queries[row, 0, position] * attention.scaling
                log_weights = torch.log_softmax(scores, dim=0)
                terms.append(-torch.logsumexp(log_weights[image[patches]], dim=0))
        attention_loss = torch.stack(terms).mean() if terms else hidden.new_zeros(())
        return attention_loss + (self._probe_loss(torch.stack(probed), targets) if probed else 0.0)

    def _probe_loss(self, states: torch.Tensor, targets: list[Shape | None]) -> torch.Tensor:
        out = self.probe(states)
        shapes = torch.tensor([SHAPES.index(t.shape) + 1 if t else 0 for t in targets])
        colours = torch.tensor([list(COLOURS).index(t.colour) + 1 if t else 0 for t in targets])
        n_shape = len(SHAPES) + 1
        loss = torch.nn.functional.cross_entropy(out[:, :n_shape], shapes)
        loss = loss + torch.nn.functional.cross_entropy(out[:, n_shape : n_shape + len(COLOURS) + 1], colours)
        present = [i for i, t in enumerate(targets) if t]
        if present:
            places = torch.tensor([[targets[i].x / SIZE * 2 - 1, targets[i].y / SIZE * 2 - 1] for i in present])
            loss = loss + torch.nn.functional.mse_loss(out[present, -2:], places)
        return loss
