"""What a run tells people while it runs: durations and the time left."""
import pytest

from jaxseg import reporting


@pytest.mark.parametrize("seconds, expected", [(0, "0s"), (44.6, "45s"), (60, "1m00s"),
                                               (750, "12m30s"), (3599.4, "59m59s"),
                                               (11100, "3h05m"), (-3, "0s")])
def test_durations_read_as_people_write_them(seconds, expected):
    assert reporting.duration(seconds) == expected


def test_run_clock_paces_by_the_epochs_after_the_compiling_one():
    clock = reporting.RunClock(epochs_left=2 * 10)  # two folds of 10 epochs
    clock.skip(3)  # done by an earlier attempt
    clock.epoch_done(100.0)  # compiled the steps
    assert clock.time_left(epochs_left_in_fold=6) == "ETA fold 10m00s, run 26m40s"
    clock.epoch_done(20.0)
    clock.epoch_done(30.0)
    assert clock.epochs_left == 14
    assert clock.time_left(epochs_left_in_fold=4) == "ETA fold 1m40s, run 5m50s"
    clock.skip(4)  # early stopping ended the fold
    assert clock.time_left(epochs_left_in_fold=0) == "ETA fold 0s, run 4m10s"
