"""`fedpipe up` keeps the server's schedule state; the file only starts a new schedule."""

from __future__ import annotations

from ops.stack.schedules import ScheduleView, kept_states

DECLARED = [{"cron": "0 2 * * 0", "timezone": "UTC", "active": False}]


def test_a_schedule_the_server_holds_keeps_its_state() -> None:
    on_server = [ScheduleView("0 2 * * 0", "UTC", active=True)]

    assert kept_states(DECLARED, on_server) == [True]


def test_a_new_schedule_takes_the_files_state() -> None:
    assert kept_states(DECLARED, None) == [False]
    assert kept_states([{"cron": "0 3 * * *"}], []) == [False]
    # another cron is another schedule: the server's state of the old one does not carry over
    assert kept_states(
        [{"cron": "0 3 * * *", "active": True}], [ScheduleView("0 2 * * 0", "UTC", False)]
    ) == [True]
