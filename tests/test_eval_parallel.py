"""HumanEval completions spread over worker processes equal the serial ones."""

from __future__ import annotations

import pytest

from kvarn.eval.common import EvalInputError, load_model_for_eval, parse_methods
from kvarn.eval.humaneval import STOP_SEQUENCES, generate_completions, load_problems, run_programs
from kvarn.eval.parallel import check_workers
from kvarn.eval.sandbox import Sandbox
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)


def test_two_workers_give_the_serial_completions(tiny_model_dir):  # noqa: F811
    loaded = load_model_for_eval(str(tiny_model_dir))
    methods = ["none", "kivi:k2v2", "kvarn:k2v2"]
    try:
        import optimum.quanto  # noqa: F401

        methods.append("hf_quanto:k2v2")
    except ImportError:
        pass
    configs = parse_methods(",".join(methods), tile_size=32)
    inputs = [p["prompt"] for p in load_problems(4)]
    args = (loaded, inputs, configs, 32, 16, STOP_SEQUENCES)
    serial = generate_completions(*args, workers=1)
    parallel = generate_completions(*args, workers=2)
    assert parallel == serial
    assert len(serial) == 4 and all(len(rows) == len(configs) + 1 for rows in serial)
    assert len({text for rows in serial for text, _ in rows}) > 4, (
        "completions all alike: the test proves little"
    )


def test_bad_worker_counts_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(EvalInputError, match="--workers"):
            check_workers(bad)


def test_identical_programs_run_once():
    class CountingSandbox(Sandbox):
        def run_many(self, programs):
            self.seen = list(programs)
            return super().run_many(programs)

    sandbox = CountingSandbox(timeout=5, use_network_namespace=False)
    programs = ["assert 1 + 1 == 2\n", "raise SystemExit(3)\n", "assert 1 + 1 == 2\n"]
    results = run_programs(sandbox, programs)
    assert sandbox.seen == programs[:2]
    assert [r.passed for r in results] == [True, False, True]
