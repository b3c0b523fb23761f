"""The demo model's training: its targets follow from the generator, its conversations are the
chat template's, its shortened sequences and its guided attention compute what the model itself
computes, and a run of a few steps writes a checkpoint the engine loads."""

import json
from pathlib import Path

import pytest
import torch

from dartserve.demo.data import COLOURS, DESCRIBE, SHAPES, WORD, conversation, example, named_objects, reading_order
from dartserve.demo.guidance import GUIDED_LAYER, FoundProbe, PlaceProbe, QuestionProbe, WORDS, guided_attention_loss
from dartserve.demo.model import build_model, build_processor
from dartserve.demo.train import AS_DRAWN, PatchTargets, _found_targets, _kept_patches, build_sequences, encode_conversation, tower_features, train


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(processor.tokenizer, width=64, layers=3, vision_width=32, vision_layers=1).eval()
    return model, processor


def chat_ids(processor, c) -> list[int]:
    messages = []
    for number, turn in enumerate(c.turns):
        messages.append({"role": "user", "content": [{"type": "image"}] * (number == 0) + [{"type": "text", "text": turn.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return processor.tokenizer(processor.apply_chat_template(messages))["input_ids"]


def test_named_objects_are_what_a_question_is_about():
    for index in range(300):
        e = example("train", index)
        first, second = ([e.objects[i] for i in named] for named in named_objects(e.question_type, e.question, e.objects))
        if e.question_type == "count":
            assert len(first) == len(e.objects) and not second
        elif e.question_type in ("colour", "shape"):  # shapes and colours are unique in an image
            assert len(first) == 1 and not second and e.answer in (first[0].colour, first[0].shape)
        elif e.question_type == "exists":  # the object of the colour asked, then the one of the shape asked
            assert all(o.colour in e.question for o in first) and all(o.shape in e.question for o in second)
            assert e.answer == ("yes" if first and first == second else "no")
        else:
            ((a,), (b,)) = first, second
            assert e.answer == ("yes" if (a.x < b.x if "left" in e.question else a.y < b.y) else "no")


def test_a_training_conversation_is_the_chat_template_s_and_its_answers_are_the_targets(tiny):
    _, processor = tiny
    vocab = processor.tokenizer.get_vocab()
    for index in range(100):
        c = conversation("train", index)
        encoded = encode_conversation(vocab, c.objects, c.turns)
        assert encoded.ids == chat_ids(processor, c)
        assert encoded.ids[encoded.image_at] == vocab["<image>"]
        targets = [processor.tokenizer.convert_ids_to_tokens(encoded.ids[p]) for p in encoded.labels]
        assert targets == [w for t in c.turns for w in (*WORD.findall(t.answer), "</s>")]
        assert [processor.tokenizer.convert_ids_to_tokens(encoded.ids[p]) for p in encoded.asking] == [":"] * len(c.turns)


def test_a_description_looks_at_each_object_in_reading_order_while_it_names_it(tiny):
    _, processor = tiny
    c = next(c for c in (conversation("train", i) for i in range(100)) if any(t.question_type == DESCRIBE for t in c.turns) and len(c.objects) >= 3)
    encoded = encode_conversation(processor.tokenizer.get_vocab(), c.objects, c.turns)
    turn = next(i for i, t in enumerate(c.turns) if t.question_type == DESCRIBE)
    asking = encoded.asking[turn]
    points = [p for p in encoded.points if asking <= p[0] < asking + len(WORD.findall(c.turns[turn].answer))]
    assert sum(p[3] for p in points) == pytest.approx(1.0)  # a description weighs what a question does
    for token, head0, head1, _ in points:
        (number,) = head0
        word = processor.tokenizer.convert_ids_to_tokens(encoded.ids[token + 1])
        o = c.objects[number - 1]
        assert not head1
        if word in SHAPES:
            assert word == o.shape
        if word in ("red", "green", "blue", "yellow", "purple", "orange"):
            assert word == o.colour
    looked = list(dict.fromkeys(next(iter(p[1])) for p in points))
    assert [c.objects[n - 1] for n in looked] == list(reading_order(c.objects))


def test_training_reads_the_images_as_the_processor_serves_them():
    processor = build_processor()
    images = [example("train", i).image for i in range(4)]
    served = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.image_processor(images, return_tensors="pt", **AS_DRAWN)["pixel_values"], served)


def test_every_patch_kept_gives_the_models_own_logits(tiny):
    model, processor = tiny
    conversations = [conversation("train", i) for i in (0, 3)]  # different lengths: padding
    vocab = processor.tokenizer.get_vocab()
    encoded = [encode_conversation(vocab, c.objects, c.turns) for c in conversations]
    keep = _kept_patches(PatchTargets.of([c.objects for c in conversations]), None, torch.Generator())
    expanded = [torch.tensor(e.ids[: e.image_at] + [vocab["<image>"]] * 576 + e.ids[e.image_at + 1 :]) for e in encoded]
    inputs = {
        "input_ids": torch.nn.utils.rnn.pad_sequence(expanded, batch_first=True, padding_value=processor.tokenizer.pad_token_id),
        "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in expanded], batch_first=True),
        "pixel_values": processor.image_processor([c.image for c in conversations], return_tensors="pt")["pixel_values"],
    }
    with torch.no_grad():
        expected = model(**inputs).logits
        projected = model.model.multi_modal_projector(tower_features(model, processor, [c.image for c in conversations]))
        seq = build_sequences(encoded, projected, model.get_input_embeddings(), keep)
        logits = model.lm_head(model.model.language_model(inputs_embeds=seq.embeds, attention_mask=seq.mask, position_ids=seq.positions).last_hidden_state)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    for row, e in enumerate(encoded):  # the answers and </s>, nothing else
        assert seq.labels[row][seq.labels[row] != -100].tolist() == [e.ids[p] for p in e.labels]


def test_a_sample_keeps_every_object_patch_and_at_most_the_background_asked():
    targets = PatchTargets.of([example("train", i).objects for i in range(6)])
    keep = _kept_patches(targets, 16, torch.Generator().manual_seed(1))
    for shapes, kept in zip(targets.shapes, keep):
        assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == len(kept)
        objects = set((shapes > 0).nonzero().flatten().tolist())
        assert objects <= set(kept.tolist()) and len(kept) - len(objects) <= 16


def test_patch_targets_name_each_patch_s_object_and_its_cell():
    e = example("train", 5)
    targets = PatchTargets.of([e.objects])
    for owner, cell, shape in zip(targets.owners[0].tolist(), targets.cells[0].tolist(), targets.shapes[0].tolist()):
        if owner:
            o = e.objects[owner - 1]
            assert (cell, shape) == (o.cell + 1, SHAPES.index(o.shape) + 1)
        else:
            assert cell == shape == 0


def test_guided_attention_is_the_layers_own_attention(tiny):
    model, processor = tiny
    model.config.text_config._attn_implementation = "eager"  # so the layer reports its attention
    try:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle ?"}]}], add_generation_prompt=True)
        inputs = processor(text=[text], images=[example("train", 0).image], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        model.config.text_config._attn_implementation = "sdpa"
    length = inputs["input_ids"].shape[1]
    asking, target = length - 1, 40
    targets = torch.zeros(2, 2, length, dtype=torch.bool)
    targets[0, 0, target] = True  # head 0 from the last token
    targets[1, 1, target + 1] = True  # head 1 from the token before it
    positions = torch.arange(length)[None]
    rows, tokens = torch.tensor([0, 0]), torch.tensor([asking, asking - 1])
    with torch.no_grad():
        loss, share = guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], positions, rows, tokens, targets, torch.tensor([3.0, 1.0]))
    weights = out.attentions[GUIDED_LAYER][0]
    first, second = weights[0, asking, target], weights[1, asking - 1, target + 1]
    torch.testing.assert_close(loss, -(3 * first.log() + second.log()) / 4, atol=1e-4, rtol=1e-4)
    assert share == pytest.approx(float(first + second) / 2, rel=1e-4)
    targets[:] = False  # a question that names nothing present adds nothing
    assert guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], positions, rows, tokens, targets, torch.ones(2)) == (0, 0.0)


def test_the_question_probe_targets_the_named_words():
    probe = QuestionProbe(8)
    torch.nn.init.zeros_(probe.words.weight)
    hidden = torch.zeros(1, 8)
    with torch.no_grad():
        probe.words.bias.copy_(torch.tensor([10.0 if w in ("red", "cross") else -10.0 for w in WORDS]))
        assert probe.loss(hidden, ["is there a red cross ?"]) < 1e-3
        assert probe.loss(hidden, ["is there a blue cross ?"]) > 0.5


def test_the_place_probe_reads_each_vision_token_s_place_from_the_guided_values():
    probe = PlaceProbe(head_dim=4)
    places = torch.tensor([[-1.0, 0.5], [0.25, -0.75], [0.0, 1.0]])
    with torch.no_grad():
        probe.marks.copy_(torch.eye(4)[:2].expand(2, 2, 4) * 3.0)  # read along unit directions, whatever their length
    values = torch.cat([places, torch.ones(3, 2)], dim=-1)[:, None].repeat(1, 2, 1)  # both heads show the place
    assert probe.loss(values, places) == 0
    shifted = values.clone()
    shifted[:, 1, 0] += 0.5  # head 1 reads every column half a unit off
    assert torch.allclose(probe.loss(shifted, places), torch.tensor(0.25 / 4))


def test_the_found_probe_names_the_one_object_each_head_is_to_find(tiny):
    _, processor = tiny
    vocab = processor.tokenizer.get_vocab()
    c = next(c for c in (conversation("train", i) for i in range(200)) if c.turns[0].question_type == "position")
    found, centres = _found_targets([encode_conversation(vocab, c.objects, c.turns)])
    first, second = (next(o for o in c.objects if o.shape == w) for w in c.turns[0].question.split() if w in SHAPES)
    for head, o in enumerate((first, second)):
        assert found[0, head].tolist() == [SHAPES.index(o.shape), list(COLOURS).index(o.colour), o.cell, 1]
        assert centres[0, head].tolist() == pytest.approx([o.x / 168 - 1, o.y / 168 - 1])
    count = next(c for c in (conversation("train", i) for i in range(200)) if c.turns[0].question_type == "count" and len(c.objects) > 1)
    counted = _found_targets([encode_conversation(vocab, count.objects, count.turns)])[0][0].tolist()
    assert counted == [[-1, -1, -1, len(count.objects)], [-1, -1, -1, 0]]  # no one object, and how many
    probe = FoundProbe(8)
    torch.nn.init.zeros_(probe.names.weight)
    torch.nn.init.zeros_(probe.centre.weight)
    targets = torch.tensor([[[1, 2, 3, 1], [-1, -1, -1, 0]]])
    where = torch.tensor([[[0.5, -0.5], [0.0, 0.0]]])
    with torch.no_grad():
        bias = torch.full((2, 4 + 6 + 9 + 5), -20.0)
        bias[0, [1, 4 + 2, 10 + 3, 19 + 1]] = 20.0  # head 0 names its object
        bias[1, 19 + 0] = 20.0  # head 1 found none, so neither its names nor its centre are asked for
        probe.names.bias.copy_(bias.flatten())
        probe.centre.bias.copy_(torch.tensor([0.5, -0.5, 9.0, 9.0]))
    assert probe.loss(torch.zeros(1, 8), targets, where, torch.ones(1)) < 1e-6
    with torch.no_grad():
        probe.centre.bias.add_(0.1)
    assert torch.allclose(probe.loss(torch.zeros(1, 8), targets, where, torch.ones(1)), torch.tensor(0.02 / 2), atol=1e-5)  # per head


def test_a_few_steps_train_a_checkpoint_the_engine_serves(tmp_path):
    from dartserve.engine import Engine

    log = train(tmp_path, steps=1, batch_size=2, vision_steps=2, vision_batch_size=2, sampled_steps=2, reuse=2, eval_every=2, eval_size=2, log_every=1, warmup=1)
    assert {"sampled", "whole"} <= set(log) and log["vision_pretraining"]["steps"] == 2
    assert json.loads((tmp_path / "training.json").read_text())["sampled"]["reuse"] == 2
    result = Engine.load(str(tmp_path)).generate([example("test", 0).image], "what colour is the circle ?")
    assert result.stats.vision_tokens == 576


def test_training_on_takes_later_images_and_the_card_says_so(tmp_path):
    from dartserve.demo.card import _run_lines

    first, second = tmp_path / "first", tmp_path / "second"
    train(first, steps=1, batch_size=2, vision_steps=0, sampled_steps=0, reuse=2, eval_every=1, eval_size=2, log_every=1, warmup=1)
    log = train(second, init=first, steps=1, batch_size=2, sampled_steps=0, reuse=2, eval_every=1, eval_size=2, log_every=1, warmup=1, images_from=4)
    assert log["whole"]["images_from"] == 4 and log["earlier"][0]["whole"]["images_from"] == 0
    assert "images from the 4th on" in "\n".join(_run_lines(2, log))


def test_negative_steps_are_refused():
    with pytest.raises(ValueError, match="negative"):
        train(Path("unused"), sampled_steps=-1)
    with pytest.raises(ValueError, match="negative"):
        train(Path("unused"), images_from=-1)
