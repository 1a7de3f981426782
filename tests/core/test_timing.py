"""The shared generation timer: round-robin order, warm-ups once, results of the last call."""

import pytest

from pytorch_mqa.core.timing import time_round_robin


def test_round_robin_order_warmups_and_results():
    log = []

    def run(name):
        def fn():
            log.append(name)
            return f"{name}{log.count(name)}"

        return fn

    out = time_round_robin([run("a"), run("b")], 3, warmups=[run("wa"), None], sync=lambda: log.append("|"))
    calls = [x for x in log if x != "|"]
    assert calls == ["wa", "a", "b", "a", "b", "a", "b"]
    assert log.count("|") == 2 * 6  # before and after each timed call, never around a warm-up
    (ta, ra), (tb, rb) = out
    assert len(ta) == len(tb) == 3 and all(t >= 0 for t in ta + tb)
    assert (ra, rb) == ("a3", "b3")  # the last call's results
    with pytest.raises(ValueError, match="repeats"):
        time_round_robin([run("a")], 0)
    with pytest.raises(ValueError, match="warmups"):
        time_round_robin([run("a")], 1, warmups=[None, None])
