"""The HumanEval execution sandbox contains misbehaving programs, scores them failed, and keeps going."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from kvarn.eval.common import EvalInputError
from kvarn.eval.humaneval import (
    CHAT_STOP_SEQUENCES,
    build_program,
    load_problems,
    model_input,
    resolve_style,
    truncate_at_stop,
)
from kvarn.eval.sandbox import Sandbox
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX resource limits")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(timeout=3.0, memory_mb=512)


def test_a_correct_program_passes_and_its_output_is_captured(sandbox):
    result = sandbox.run("print('hello')\nassert sum([1, 2]) == 3\n")
    assert result.passed and result.status == "passed"
    assert result.stdout.strip() == "hello"


def test_a_failing_assertion_fails(sandbox):
    result = sandbox.run("assert 1 == 2, 'nope'\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError: nope" in result.stderr


def test_an_endless_loop_times_out(sandbox):
    result = sandbox.run("while True:\n    pass\n")
    assert not result.passed and result.status == "timeout"
    assert result.seconds < sandbox.timeout + 5


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
        # Printing something that looks like the harness's success line does not help without the run's token.
        "print('KVARN-SANDBOX-DONE 0123')\nimport os\nos._exit(0)\n",
    ],
)
def test_exiting_early_cannot_fake_a_pass(sandbox, program):
    result = sandbox.run(program)
    assert not result.passed


def test_writing_outside_the_temporary_folder_is_refused(sandbox, tmp_path):
    target = tmp_path / "written-by-sandboxed-code.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import shutil\nshutil.copyfile(__file__, {str(target)!r})\n",
    ):
        result = sandbox.run(program)
        assert not result.passed and "outside the sandbox directory" in result.stderr
    assert not target.exists()
    # Deleting or renaming files outside is refused as well.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'x')\n",
    ):
        assert not sandbox.run(program).passed
    assert victim.read_text() == "keep me"


def test_writing_inside_the_temporary_folder_works(sandbox):
    program = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert sandbox.run(program).passed


def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for program in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n",
        ):
            result = sandbox.run(program)
            assert not result.passed
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_processes_cannot_be_started(sandbox):
    for program in (
        "import os\nwhile True:\n    os.fork()\n",  # fork bomb
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import os\nos.execv('/bin/true', ['true'])\n",
    ):
        result = sandbox.run(program)
        assert not result.passed and result.status == "failed"


def test_memory_is_limited(sandbox):
    result = sandbox.run("blob = bytearray(2 * 1024 ** 3)\n")
    assert not result.passed and "MemoryError" in result.stderr


def test_the_harness_keeps_going_and_keeps_order(sandbox):
    programs = ["assert True\n", "while True:\n    pass\n", "import os\nos._exit(0)\n", "x = 1\n"]
    results = sandbox.run_many(programs)
    assert [r.passed for r in results] == [True, False, False, True]


def test_the_evaluating_process_is_untouched(sandbox):
    pid = os.getpid()
    sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert os.getpid() == pid  # still alive to assert this


def test_canonical_humaneval_solutions_pass_and_truncated_ones_fail(sandbox):
    problems = load_problems(limit=5)
    good = sandbox.run_many([build_program(p, p["canonical_solution"]) for p in problems])
    assert all(r.passed for r in good), [r.stderr for r in good if not r.passed]
    bad = sandbox.run_many([build_program(p, "    pass\n") for p in problems])
    assert not any(r.passed for r in bad)


def test_chat_style_programs_use_the_generated_function(sandbox):
    problems = load_problems(limit=3)
    # A chat answer is a whole function; the prompt before it only provides imports and helpers.
    whole = [p["prompt"] + p["canonical_solution"] for p in problems]
    good = sandbox.run_many([build_program(p, w, "chat") for p, w in zip(problems, whole, strict=True)])
    assert all(r.passed for r in good), [r.stderr for r in good if not r.passed]
    stub_only = sandbox.run_many([build_program(p, "", "chat") for p in problems])
    assert not any(r.passed for r in stub_only)


def test_chat_prompts_use_the_template_and_prime_a_code_fence(tiny_tokenizer_with_template):
    problem = load_problems(limit=1)[0]
    text = model_input(
        problem, resolve_style("auto", tiny_tokenizer_with_template), tiny_tokenizer_with_template
    )
    assert text.startswith("<user>Write a Python function") and text.endswith("<assistant>```python\n")
    assert problem["prompt"] in text
    assert (
        truncate_at_stop("def f():\n    return 1\n```\nprose", CHAT_STOP_SEQUENCES)
        == "def f():\n    return 1\n"
    )


@pytest.fixture
def tiny_tokenizer_with_template(tiny_model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def test_prompt_style_resolution(tiny_model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert resolve_style("auto", plain) == "completion"
    with pytest.raises(EvalInputError, match="chat template"):
        resolve_style("chat", plain)
    with pytest.raises(EvalInputError, match="unknown"):
        resolve_style("fancy", plain)


def test_stop_sequences_cut_the_completion():
    completion = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert truncate_at_stop(completion) == "    return x + 1\n\n"
    assert truncate_at_stop("    return 1") == "    return 1"
    assert truncate_at_stop("    a = 1\nif __name__ == '__main__':\n") == "    a = 1"
    assert truncate_at_stop("    a = 1\n# trailing comment\n") == "    a = 1"


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="bad sandbox limits"):
        Sandbox(timeout=0)
