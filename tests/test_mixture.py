"""The mixture rule: exact per-step shares, within one row of the share at every step, pure in step; usage over a run."""

from __future__ import annotations

import pytest

from finetrack.mixture import Deal, Mixture, step_counts, step_rows


def test_whole_shares_are_exact_every_step():
    for step in range(1, 50):
        assert step_counts((0.5, 0.25, 0.25), 8, step) == (4, 2, 2)


@pytest.mark.parametrize("weights, rows_per_step", [((0.5, 0.3, 0.2), 7), ((1.0, 3.0), 5), ((0.6, 0.25, 0.1, 0.05), 3)])
def test_counts_stay_within_one_row_of_the_share(weights, rows_per_step):
    total = sum(weights)
    cumulative = [0] * len(weights)
    for step in range(1, 200):
        counts = step_counts(weights, rows_per_step, step)
        assert sum(counts) == rows_per_step and min(counts) >= 0
        cumulative = [c + x for c, x in zip(cumulative, counts)]
        for c, w in zip(cumulative, weights):
            assert abs(c - w / total * step * rows_per_step) < 1


def test_a_step_is_the_same_whether_computed_in_order_or_alone():
    weights = (0.5, 0.3, 0.2)
    in_order = [step_rows((10, 4, 100), weights, 7, 3, s) for s in range(1, 40)]
    from finetrack import mixture

    mixture._deal.cache_clear()
    assert step_rows((10, 4, 100), weights, 7, 3, 33) == in_order[32]  # a resume at step 33, nothing dealt before


def test_a_small_source_repeats_reshuffled_in_its_own_epochs():
    rows = [r for s in range(1, 21) for r in step_rows((3, 50), (0.5, 0.5), 4, 0, s) if r[0] == 0]
    by_epoch = {}
    for _, index, epoch in rows:
        by_epoch.setdefault(epoch, []).append(index)
    assert all(sorted(v) == [0, 1, 2] for e, v in by_epoch.items() if e < max(by_epoch))
    assert len({tuple(v) for e, v in by_epoch.items() if e < max(by_epoch)}) > 1  # reshuffled between epochs


def test_counts_at_any_row_equal_a_fresh_deal_up_to_it():
    """The kept deal answers for an earlier row (a lookup) exactly as a deal that stopped there."""
    weights = (0.5, 0.3, 0.2)
    long = Deal(weights)
    long.counts(3 * Deal.BLOCK + 17)
    for num_rows in (0, 1, 7, Deal.BLOCK - 1, Deal.BLOCK, Deal.BLOCK + 5, 2 * Deal.BLOCK + 999):
        assert long.counts(num_rows) == Deal(weights).counts(num_rows), num_rows


def test_steps_before_repeat_is_the_last_step_without_a_repeat():
    mixture = Mixture(("a", "b", "c"), (0.5, 0.3, 0.2), (40, 9, 30))
    last = mixture.steps_before_repeat(7)
    assert all(c <= n for c, n in zip(mixture.drawn(7, last), mixture.sizes))
    assert any(c > n for c, n in zip(mixture.drawn(7, last + 1), mixture.sizes))
    rows = [r for s in range(1, last + 1) for r in mixture.step(7, 0, s)]
    assert len(rows) == len(set(rows))  # no row twice before then


def test_usage_counts_rows_epochs_and_tokens_as_the_steps_take_them():
    mixture = Mixture(("a", "b"), (0.75, 0.25), (10, 3))
    lengths = [[10 + i for i in range(10)], [100 * (i + 1) for i in range(3)]]
    usage = mixture.usage(4, 7, 5, lengths)
    taken = [r for s in range(1, 8) for r in mixture.step(4, 5, s)]
    tokens = [sum(lengths[0][r] for r in taken if r < 10), sum(lengths[1][r - 10] for r in taken if r >= 10)]
    assert [u["rows_drawn"] for u in usage] == [21, 7]
    assert [u["tokens_drawn"] for u in usage] == tokens
    assert [u["epochs"] for u in usage] == [2.1, round(7 / 3, 4)]
    assert [u["realized_share"] for u in usage] == [0.75, 0.25]
