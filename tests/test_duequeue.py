"""The due-time queue (``relay.duequeue``): pure, no clock, no loop."""

from __future__ import annotations

from relay.duequeue import DueQueue


def test_ids_come_out_when_due_earliest_first() -> None:
    queue = DueQueue()
    assert queue.schedule("b", 20.0)
    assert queue.schedule("a", 10.0)
    assert queue.schedule("c", 30.0)
    assert queue.next_due() == 10.0
    assert queue.pop_due(9.9) == []
    assert queue.pop_due(20.0) == ["a", "b"]
    assert queue.next_due() == 30.0
    assert len(queue) == 1


def test_an_id_is_due_at_the_earliest_time_it_was_scheduled_for() -> None:
    queue = DueQueue()
    assert queue.schedule("a", 20.0)
    assert not queue.schedule("a", 25.0)  # later: nothing changes
    assert queue.schedule("a", 5.0)  # sooner: moved forward
    assert len(queue) == 1
    assert queue.pop_due(5.0) == ["a"]
    assert queue.pop_due(100.0) == []  # the superseded 20.0 is skipped
    assert queue.next_due() is None


def test_an_id_taken_out_can_be_scheduled_again() -> None:
    queue = DueQueue()
    queue.schedule("a", 1.0)
    assert queue.pop_due(1.0) == ["a"]
    assert queue.schedule("a", 50.0)
    assert queue.pop_due(49.0) == []
    assert queue.pop_due(50.0) == ["a"]
