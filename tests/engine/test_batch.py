"""DecodeBatch's compaction order: which old row each row takes when rows end."""

import itertools

from app.engine.batch import fill_order


def test_fill_order_moves_only_survivors_past_the_new_size_into_rows_that_ended() -> None:
    for total in range(7):
        for n in range(total + 1):
            for survivors in map(list, itertools.combinations(range(total), n)):
                order = fill_order(survivors)
                assert sorted(order) == survivors  # every survivor once
                moved = [(row, old) for row, old in enumerate(order) if old != row]
                for row, old in moved:
                    assert row not in survivors  # only a row that ended is written
                    assert old >= n  # from past the new size: never a row still to be read
                ended_below = sum(1 for row in range(n) if row not in survivors)
                assert len(moved) == ended_below  # one copy per row that ended below n, no more


def test_one_row_ending_moves_at_most_the_last_row() -> None:
    assert fill_order([1, 2, 3, 4, 5]) == [5, 1, 2, 3, 4]  # shifting down would move all five
    assert fill_order([0, 1, 2, 4, 5]) == [0, 1, 2, 5, 4]
    assert fill_order([0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]  # the last row ended: nothing moves
    assert fill_order([]) == []
