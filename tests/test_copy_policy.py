"""copy_policy.graph_step_copies: the block in which decode launches may take TMA (GraphDecoder's
warm-up and recording). It nests, unwinds on errors, and is per thread."""

import threading

import pytest

from kvarn.attention.triton.copy_policy import graph_step_copies, graph_step_copies_active


def test_graph_step_copies_nests_and_unwinds():
    assert not graph_step_copies_active()
    with graph_step_copies():
        assert graph_step_copies_active()
        with graph_step_copies():
            assert graph_step_copies_active()
        assert graph_step_copies_active()  # the outer block is still open
    assert not graph_step_copies_active()
    with pytest.raises(RuntimeError, match="step failed"), graph_step_copies():
        raise RuntimeError("step failed")
    assert not graph_step_copies_active()


def test_graph_step_copies_is_per_thread():
    seen = []
    with graph_step_copies():
        t = threading.Thread(target=lambda: seen.append(graph_step_copies_active()))
        t.start()
        t.join()
        assert graph_step_copies_active()
    assert seen == [False]
