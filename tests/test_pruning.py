"""The pruning methods and their configuration, on small hand-made inputs."""

import pytest
import torch

from dartserve.pruning import Grid, ImageSpan, PruningConfig, SelectionContext, dart_select, divprune_select, get_method, split_proportional
from dartserve.pruning.cdpruner import greedy_map, relevance_scores
from dartserve.pruning.spatial import grid_regions, span_regions


def keys_with_norms(norms):
    """Keys whose L1 norm is the given value per position."""
    return torch.tensor(norms, dtype=torch.float)[:, None] * torch.tensor([[0.5, -0.5]])


def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


# --- dart_select ---------------------------------------------------------------------------


def test_dart_hand_made_case():
    # [t0, i1, i2, i3, i4, i5, t6, t7]: image pivot i3 (largest image key norm), text pivot t7.
    keys = keys_with_norms([9, 1, 2, 5, 1, 1, 0.5, 3])
    hidden = unit(0, 180, 10, 0, 20, 90, 0, -90)
    # One slot each: i3 (0 deg) claims i1 (180 deg, least similar); then t7 (-90 deg) claims i5 (90 deg).
    got = dart_select(hidden, keys, image_start=1, image_len=5, budget=3, pivot_image=1, pivot_text=1)
    assert got.tolist() == [1, 3, 5]
    assert got.dtype == torch.long


def test_dart_claimed_tokens_leave_the_pool():
    # Both pivots find i1 least similar; the later pivot (t7) must take its next choice, i2.
    keys = keys_with_norms([9, 1, 1, 5, 1, 1, 0.5, 3])
    hidden = unit(0, 180, 150, 0, 10, 20, 0, 10)
    got = dart_select(hidden, keys, 1, 5, budget=3, pivot_image=1, pivot_text=1)
    assert got.tolist() == [1, 2, 3]


def test_dart_remainder_goes_to_the_first_pivots():
    # [t0, i1..i10, t11..t14]: image pivot i3, text pivot t12. Image token i_k points at 10(k-1) deg.
    keys = keys_with_norms([0] + [1] * 10 + [0, 7, 0, 0])
    keys[3] *= 4
    hidden = torch.cat([unit(0), unit(*range(0, 100, 10)), unit(0, 197, 0, 0)])
    # 5 free slots over 2 pivots: i3 (20 deg, first by position) claims 3, the farthest from it:
    # i10, i9, i8; then t12 (197 deg) claims 2, those nearest 17 deg: i2 and i4.
    got = dart_select(hidden, keys, 1, 10, budget=6, pivot_image=1, pivot_text=1)
    assert got.tolist() == [2, 3, 4, 8, 9, 10]


def test_dart_pivots_go_in_position_order_not_norm_order():
    # [t0, i1..i6, t7]: image pivots i2 (0 deg, norm 5) and i5 (30 deg, norm 9); no text pivots.
    # 3 free slots: i2, first by position, claims 2 and goes first: i3 (175 deg) and i1 (200 deg);
    # then i5 claims the farthest left from 30 deg: i6 (240 deg) rather than i4 (150 deg).
    # Going in norm order instead, i5 would take i1 first and i2 then i3 and i4.
    keys = keys_with_norms([0, 1, 5, 1, 1, 9, 1, 0])
    hidden = torch.cat([unit(0), unit(200, 0, 175, 150, 30, 240), unit(0)])
    got = dart_select(hidden, keys, 1, 6, budget=5, pivot_image=2, pivot_text=0)
    assert got.tolist() == [1, 2, 3, 5, 6]


def test_dart_image_pivots_kept_text_pivots_not():
    torch.manual_seed(0)
    hidden, keys = torch.randn(40, 16), torch.randn(40, 8)
    keys[[5, 12, 20, 29]] *= 50  # image pivots
    keys[[33, 36]] *= 50  # text pivots, after the image
    got = dart_select(hidden, keys, 4, 26, budget=9, pivot_image=4, pivot_text=2).tolist()
    assert {5, 12, 20, 29} <= set(got)
    assert all(4 <= p < 30 for p in got)
    assert got == sorted(set(got))


def test_dart_text_pivots_skip_the_next_images_tokens():
    # [t0, image A 1..8, t9, image B 10..17, t18, t19]: image B's keys are the loudest after A,
    # but they are not text. A's tokens 1-4 look like text token 18, tokens 5-8 like image B.
    hidden = torch.zeros(20, 3)
    hidden[[0, 9, 19], 2] = 1
    hidden[[1, 2, 3, 4, 18], 0] = 1
    hidden[5:18, 1] = 1
    keys = torch.ones(20, 4)
    keys[10:18] *= 10
    keys[18] *= 3
    text = torch.ones(20, dtype=torch.bool)
    text[1:9] = text[10:18] = False
    # The text pivot is token 18: it claims the tokens least like it, 5 and 6.
    assert dart_select(hidden, keys, 1, 8, budget=2, pivot_image=0, pivot_text=1, text=text).tolist() == [5, 6]
    # Without the mask, image B's token 10 would be the "text" pivot.
    assert dart_select(hidden, keys, 1, 8, budget=2, pivot_image=0, pivot_text=1).tolist() == [1, 2]
    with pytest.raises(ValueError, match="bool mask"):
        dart_select(hidden, keys, 1, 8, budget=2, pivot_image=0, text=text[:-1])


@pytest.mark.parametrize("budget", [4, 5, 7, 13, 25, 26])
def test_dart_exact_budget(budget):
    torch.manual_seed(budget)
    got = dart_select(torch.randn(40, 16), torch.randn(40, 8), 4, 26, budget)
    assert len(got) == budget == len(set(got.tolist()))


def test_dart_ties_are_deterministic():
    # Everything equal: pivots and candidates are taken lowest position first.
    hidden, keys = torch.ones(20, 4), torch.ones(20, 4)
    first = dart_select(hidden, keys, 2, 12, budget=7)
    assert first.tolist() == list(range(2, 9))
    assert torch.equal(first, dart_select(hidden, keys, 2, 12, budget=7))


def test_dart_with_no_text_after_the_image():
    torch.manual_seed(1)
    got = dart_select(torch.randn(10, 4), torch.randn(10, 4), 2, 8, budget=5)
    assert len(got) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(image_start=0, image_len=10, budget=11),  # more than the image has
        dict(image_start=0, image_len=10, budget=3),  # fewer than the image pivots
        dict(image_start=5, image_len=20, budget=8),  # span past the sequence
        dict(image_start=0, image_len=10, budget=4, pivot_image=0, pivot_text=0),  # no pivots
        dict(image_start=0, image_len=10, budget=4, pivot_text=-1),  # negative pivots
        dict(image_start=0, image_len=10, budget=4, pivot_image=-1),
    ],
)
def test_dart_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        dart_select(torch.randn(20, 4), torch.randn(20, 4), **kwargs)


# --- DivPrune -----------------------------------------------------------------------------


def test_divprune_picks_the_farthest_nearest_neighbour_then_max_min():
    # Tokens 0 and 1 are close, 2 and 3 are close, 4 sits apart: its nearest neighbour is the
    # farthest, so it comes first; then the token farthest from it, then the farthest from both.
    features = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert divprune_select(features, 1).tolist() == [4]
    assert divprune_select(features, 3).tolist() == [0, 2, 4]
    # Budget n-1: tokens 1 and 3 are each 0.005 from a kept token; the tie goes to the lower.
    assert divprune_select(features, 4).tolist() == [0, 1, 2, 4]
    assert divprune_select(features, 5).tolist() == [0, 1, 2, 3, 4]


def test_divprune_ties_go_to_the_lowest_position_and_duplicates_are_never_taken_twice():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # every nearest neighbour equally far
    assert divprune_select(square, 1).tolist() == [0]
    assert divprune_select(square, 2).tolist() == [0, 2]  # opposite of 0 is farthest
    twins = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # all the same direction: distances all 0
    assert divprune_select(twins, 3).tolist() == [0, 1, 2]
    assert divprune_select(twins, 1).tolist() == [0]


@pytest.mark.parametrize("budget", [-1, 6, 2.5])
def test_divprune_rejects_bad_budgets(budget):
    with pytest.raises(ValueError):
        divprune_select(torch.randn(5, 3), budget)


# --- CDPruner -----------------------------------------------------------------------------


def _log_det(kernel, items):
    return torch.logdet(kernel[items][:, items].double()) if items else torch.tensor(0.0, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_cdpruner_greedy_map_takes_the_best_log_det_gain_at_every_step(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(7, 5, generator=generator)
    unit = torch.nn.functional.normalize(features, dim=-1)
    relevance = torch.rand(7, generator=generator) + 0.5
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    picked = greedy_map(kernel, 4).tolist()
    chosen = []
    for step in range(4):  # exhaustive: every candidate's log det, the largest taken
        gains = {j: float(_log_det(kernel, chosen + [j])) for j in range(7) if j not in chosen}
        best = max(gains.values())
        assert gains[picked[step]] == pytest.approx(best, abs=1e-9)
        chosen.append(picked[step])


def test_cdpruner_beyond_the_kernel_s_rank_takes_the_rest_by_relevance():
    unit = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), dim=-1)
    relevance = torch.tensor([1.0, 2.0, 3.0, 0.5])
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    picked = greedy_map(kernel, 4).tolist()
    assert sorted(picked) == [0, 1, 2, 3] and picked[0] == 2  # the most relevant first; rank 2 spent after two
    assert relevance_scores(unit, unit[:0], 0.5).tolist() == [1.0] * 4  # no question: diversity alone
    scores = relevance_scores(unit, unit[2:3], 0.5)
    assert int(scores.argmax()) == 2 and float(scores.min()) > 0
    assert relevance_scores(unit, unit[2:3], 0.0).tolist() == [1.0] * 4  # theta 0 ignores relevance


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "unknown pruning method"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=1.5), "ratio"),
        (dict(budget=0), "budget"),
        (dict(budget=2.5), "budget"),
        (dict(budget=10, ratio=0.5), "either"),
        (dict(layer=-1), "layer"),
        (dict(method="fastv", budget=8, layer=0), "cannot prune before the LLM"),
        (dict(method="window_fastv", budget=8, layer=0), "cannot prune before the LLM"),
        (dict(method="cdpruner", relevance_weight=1.0), "relevance_weight"),
        (dict(method="cdpruner", relevance_weight=-0.1), "relevance_weight"),
        (dict(pivot_image=-1), "pivot"),
        (dict(pivot_image=0, pivot_text=0), "pivot"),
    ],
)
def test_config_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_config_budget_checks():
    with pytest.raises(ValueError, match="larger than"):
        PruningConfig(budget=600).total_budget(576)
    with pytest.raises(ValueError, match="pivot_image"):
        PruningConfig(budget=3).span_budgets([576])
    with pytest.raises(ValueError, match="outside the model's layers"):
        PruningConfig(budget=64, layer=32).check_layers(32)
    PruningConfig(budget=64, layer=31).check_layers(32)
    PruningConfig(budget=64, layer=0).check_layers(32)  # before the LLM
    assert PruningConfig(ratio=0.111).total_budget(576) == 64
    assert [PruningConfig(ratio=0.5).total_budget(n) for n in (5, 7, 9, 11)] == [3, 4, 5, 6]  # halves round up
    assert PruningConfig(method="none").total_budget(576) == 576
    # A setting the method does not read is refused, and left out of the config as applied.
    for method, setting in (("none", {"budget": 5}), ("none", {"layer": 3}), ("random", {"pivot_image": 2}), ("fastv", {"seed": 1}), ("dart", {"seed": 1})):
        with pytest.raises(ValueError, match=f"does not use {next(iter(setting))}"):
            PruningConfig(method=method, **setting)
    assert PruningConfig(method="none").to_dict() == {"method": "none"}
    assert PruningConfig(method="random", budget=3, seed=5).to_dict() == {"method": "random", "budget": 3, "ratio": None, "layer": 2, "seed": 5}
    assert PruningConfig.from_dict(PruningConfig(method="dart", ratio=0.2, pivot_text=2).to_dict()) == PruningConfig(method="dart", ratio=0.2, pivot_text=2)
    assert PruningConfig(budget=64).span_budgets([576, 288]) == [43, 21]
    for method in ("pooling", "window_fastv"):  # each image keeps at least one token
        with pytest.raises(ValueError, match="at least one token per image"):
            PruningConfig(method=method, budget=1).span_budgets([576, 576])
        assert PruningConfig(method=method, budget=2).span_budgets([576, 576]) == [1, 1]
    assert PruningConfig.from_dict({"method": "fastv", "budget": 9}).budget == 9
    with pytest.raises(ValueError, match="unknown pruning fields"):
        PruningConfig.from_dict({"budjet": 9})


def test_engine_rejects_bad_pruning(engines):
    from tiny_checkpoints import make_image

    engine = engines["llava"]
    with pytest.raises(ValueError, match="larger than"):
        engine.generate([make_image(0)], "hi", pruning=PruningConfig(budget=37))
    with pytest.raises(ValueError, match="outside the model's layers"):
        engine.generate([make_image(0)], "hi", pruning=PruningConfig(budget=8, layer=4))
    with pytest.raises(ValueError, match="PIL"):
        engine.generate(["not an image"], "hi")
    with pytest.raises(ValueError, match="PruningConfig"):
        engine.generate([make_image(0)], "hi", pruning={"method": "dart"})
    with pytest.raises(ValueError, match="SamplingConfig"):
        engine.generate([make_image(0)], "hi", sampling={"max_new_tokens": 4})


def test_split_proportional():
    assert split_proportional(8, [3, 3, 3]) == [3, 3, 2]
    assert split_proportional(7, [10, 0, 4]) == [5, 0, 2]
    assert sum(split_proportional(64, [576, 2304, 1000])) == 64
    with pytest.raises(ValueError):
        split_proportional(5, [2, 2])


# --- spatial methods ----------------------------------------------------------------------


@pytest.mark.parametrize("h, w, n", [(6, 6, 1), (6, 6, 7), (6, 6, 36), (24, 24, 64), (24, 24, 191), (2, 10, 3), (9, 4, 13)])
def test_grid_regions_partition_the_grid(h, w, n):
    regions = grid_regions(h, w, n)
    cells = [(r, c) for rows, cols in regions for r in rows for c in cols]
    assert len(regions) == n
    assert sorted(cells) == [(r, c) for r in range(h) for c in range(w)]


def fake_context(scores, seq, dim=3):
    torch.manual_seed(0)
    hidden = torch.randn(seq, dim)
    return SelectionContext(hidden=hidden, normed=hidden, keys=hidden, vision=torch.zeros(seq, dtype=torch.bool), last_attention_fn=lambda: scores)


def test_pooling_averages_regions_at_their_centre():
    span = ImageSpan(start=2, length=16, grids=(Grid(0, 4, 4, 4),))
    ctx = fake_context(None, 20)
    selection = get_method("pooling")(ctx, span, 4, PruningConfig(method="pooling", budget=4))
    # Four 2x2 quadrants; each centre rounds to the top-left cell of the quadrant.
    assert selection.positions.tolist() == [2 + 0, 2 + 2, 2 + 8, 2 + 10]
    torch.testing.assert_close(selection.weights.sum(dim=1), torch.ones(4))
    expected = ctx.hidden[[2, 3, 6, 7]].mean(dim=0)
    torch.testing.assert_close(selection.weights[0] @ ctx.hidden[2:18], expected)


def test_spatial_methods_skip_row_separators():
    # LLaVA-NeXT-like: a 2x2 base grid, then a 2x3 grid with a newline token after each row.
    span = ImageSpan(0, 4 + 2 * 4, (Grid(0, 2, 2, 2), Grid(4, 2, 3, 4)))
    newlines = {7, 11}
    cells = {c for region in span_regions(span, 10) for c in region.cells}
    assert cells == set(range(12)) - newlines
    with pytest.raises(ValueError, match="grid cells"):
        span_regions(span, 11)


def test_window_fastv_spreads_budget_over_windows():
    # All attention mass sits in the top-left quadrant, yet every window keeps a token.
    scores = torch.zeros(16)
    scores[[0, 1, 4, 5]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    span = ImageSpan(0, 16, (Grid(0, 4, 4, 4),))
    config = PruningConfig(method="window_fastv", budget=4)
    kept = get_method("window_fastv")(fake_context(scores, 16), span, 4, config).positions.tolist()
    assert kept == [0, 2, 8, 10]
    fastv = get_method("fastv")(fake_context(scores, 16), span, 4, PruningConfig(method="fastv", budget=4))
    assert fastv.positions.tolist() == [0, 1, 4, 5]


def test_random_is_seeded():
    span = ImageSpan(1, 30, (Grid(0, 5, 6, 6),))
    pick = lambda seed: get_method("random")(fake_context(None, 40), span, 8, PruningConfig(method="random", budget=8, seed=seed)).positions  # noqa: E731
    assert torch.equal(pick(3), pick(3))
    assert not torch.equal(pick(3), pick(4))
    assert len(set(pick(3).tolist())) == 8


def test_applied_pruning_gives_the_amount_in_tokens():
    assert PruningConfig(method="dart", ratio=64 / 576).applied(576) == {"method": "dart", "budget": 64, "layer": 2, "pivot_image": 4, "pivot_text": 4}
    assert PruningConfig(method="fastv", ratio=0.25).applied(100) == {"method": "fastv", "budget": 25, "layer": 2}
    assert PruningConfig(method="random", budget=None, seed=3).applied(576) == {"method": "random", "budget": 576, "layer": 2, "seed": 3}  # keeps every token
    assert PruningConfig(method="none").applied(576) == {"method": "none"}
