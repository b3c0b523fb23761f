"""The demo model's training: its targets follow from the generator, its shortened sequences and
its guided attention compute what the model itself computes."""

from pathlib import Path

import pytest
import torch

from dartserve.demo.data import example, named_roles
from dartserve.demo.guidance import GUIDED_LAYER, PlaceProbe, QuestionProbe, WORDS, guided_attention_loss
from dartserve.demo.model import build_model, build_processor
from dartserve.demo.train import AS_DRAWN, PatchTargets, _kept_patches, _sequences, _with_positions, batch_inputs, train


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    processor = build_processor()
    processor.tokenizer.padding_side = "right"
    model = build_model(processor.tokenizer, width=64, layers=3, vision_width=32, vision_layers=1).eval()
    return model, processor


def test_named_roles_pick_the_objects_the_question_names():
    for index in range(200):
        e = example("train", index)
        roles = named_roles(e)
        named = [o for o, r in zip(e.objects, roles) if r == 1]
        if e.question_type == "count":
            assert set(roles) == {1}
        elif e.question_type in ("colour", "shape"):  # shapes and colours are unique in an image
            assert len(named) == 1 and e.answer in (named[0].colour, named[0].shape)
        elif e.question_type == "exists":
            assert len(named) == (1 if e.answer == "yes" else 0)
        else:
            (first,) = named
            (second,) = [o for o, r in zip(e.objects, roles) if r == 2]
            before = first.x < second.x if "left" in e.question else first.y < second.y
            assert e.answer == ("yes" if before else "no")


def test_training_reads_the_images_as_the_processor_serves_them():
    processor = build_processor()
    images = [example("train", i).image for i in range(4)]
    served = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.image_processor(images, return_tensors="pt", **AS_DRAWN)["pixel_values"], served)


def test_every_patch_kept_gives_the_models_own_logits(tiny):
    model, processor = tiny
    examples = [example("train", i) for i in (0, 3)]  # prompts of different lengths: padding
    inputs = batch_inputs(processor, examples)
    targets = PatchTargets.of(examples)
    keep = _kept_patches(targets, None, torch.Generator())
    with torch.no_grad():
        expected = model(**inputs).logits
        features = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
        projected = model.model.multi_modal_projector(features)
        embeds, mask, positions, labels, _ = _sequences(inputs, projected, model.get_input_embeddings(), model.config.image_token_index, keep)
        logits = model.lm_head(model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    for row in range(2):  # the answer word and </s>, nothing else
        assert labels[row][labels[row] != -100].tolist() == inputs["input_ids"][row][real[row]][-2:].tolist()


def test_a_sample_keeps_every_object_patch_and_at_most_the_background_asked(tiny):
    examples = [example("train", i) for i in range(6)]
    targets = PatchTargets.of(examples)
    keep = _kept_patches(targets, 16, torch.Generator().manual_seed(1))
    for shapes, kept in zip(targets.shapes, keep):
        assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == len(kept)
        objects = set((shapes > 0).nonzero().flatten().tolist())
        assert objects <= set(kept.tolist()) and len(kept) - len(objects) <= 16


def test_guided_attention_is_the_layers_own_attention(tiny):
    model, processor = tiny
    model.config.text_config._attn_implementation = "eager"  # so the layer reports its attention
    try:
        inputs = batch_inputs(processor, [example("train", 0)])
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        model.config.text_config._attn_implementation = "sdpa"
    length = inputs["input_ids"].shape[1]
    asking, target = torch.tensor([length - 3]), 40
    roles = torch.zeros(1, length, dtype=torch.long)
    roles[0, target] = 1
    positions = torch.arange(length)[None]
    with torch.no_grad():
        loss, share = guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], positions, asking, roles)
    weight = out.attentions[GUIDED_LAYER][0, 0, length - 3, target]
    torch.testing.assert_close(loss, -weight.log(), atol=1e-4, rtol=1e-4)
    assert share == pytest.approx(float(weight), rel=1e-4)
    roles[:] = 0  # a question that names nothing present adds nothing
    assert guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], positions, asking, roles) == (0, 0.0)


def test_the_question_probe_targets_the_named_words():
    probe = QuestionProbe(8)
    torch.nn.init.zeros_(probe.words.weight)
    hidden = torch.zeros(1, 8)
    with torch.no_grad():
        probe.words.bias.copy_(torch.tensor([10.0 if w in ("red", "cross") else -10.0 for w in WORDS]))
        assert probe.loss(hidden, ["is there a red cross ?"]) < 1e-3
        assert probe.loss(hidden, ["is there a blue cross ?"]) > 0.5


def test_the_place_probe_reads_the_guided_values_and_the_named_objects_centres():
    probe = PlaceProbe(head_dim=4, width=8)
    places = torch.tensor([[-1.0, 0.5], [0.25, -0.75], [0.0, 1.0]])
    with torch.no_grad():
        probe.marks.copy_(torch.eye(4)[:2].expand(2, 2, 4) * 3.0)  # read along unit directions, whatever their length
        torch.nn.init.zeros_(probe.named.weight)
    values = torch.cat([places, torch.ones(3, 2)], dim=-1)[:, None].repeat(1, 2, 1)  # both heads show the place
    hidden = torch.zeros(1, 8)
    count = next(e for e in (example("test", i) for i in range(5)) if e.question_type == "count")
    assert probe.loss(values, places, hidden, [count]) == 0  # a count names no one place
    shifted = values.clone()
    shifted[:, 1, 0] += 0.5  # head 1 reads every column half a unit off
    assert torch.allclose(probe.loss(shifted, places, hidden, [count]), torch.tensor(0.25 / 4))
    position = next(e for e in (example("test", i) for i in range(5, 10)) if e.question_type == "position")
    first, second = (next(o for o in position.objects if o.shape == w) for w in position.question.split() if w in ("circle", "square", "triangle", "cross"))
    centres = torch.tensor([first.x, first.y, second.x, second.y]) / 336 * 2 - 1
    with torch.no_grad():
        probe.named.bias.copy_(centres)
    assert torch.allclose(probe.loss(values, places, hidden, [position]), torch.tensor(0.0))
    with torch.no_grad():
        probe.named.bias.copy_(centres + 0.1)
    assert torch.allclose(probe.loss(values, places, hidden, [position]), torch.tensor(0.01))


def test_phase_four_makes_every_other_example_a_position_question():
    examples = [_with_positions(7_500_000 + i) for i in range(10)]
    assert [e.question_type for e in examples[1::2]] == ["position"] * 5
    assert [e.question for e in examples[::2]] == [example("train", 7_500_000 + i).question for i in range(0, 10, 2)]  # the rest as drawn
    assert len({e.objects for e in examples[1::2]}) == 5  # distinct examples, not one repeated


def test_negative_steps_are_refused():
    with pytest.raises(ValueError, match="negative"):
        train(Path("unused"), sampled_steps=-1)
