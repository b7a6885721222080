"""The mixture rule (work in progress): exact per-step shares, within one row of the share at every step, pure in step."""

from __future__ import annotations

import pytest

from finetrack.mixture import _replay, step_counts, step_rows


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
    _replay.cache_clear()
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
