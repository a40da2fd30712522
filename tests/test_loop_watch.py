"""The suite's loop watch (tests/conftest.py): debug loops, slow callbacks, handler calls."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


async def test_the_loop_runs_in_debug_mode_with_a_10_ms_limit() -> None:
    loop = asyncio.get_running_loop()
    assert loop.get_debug()
    assert loop.slow_callback_duration == 0.01


@pytest.mark.slow
def test_the_watch_fails_what_it_should_on_both_loops(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        asyncio_mode = "auto"
        asyncio_default_fixture_loop_scope = "function"
        filterwarnings = ["error"]
        markers = ["allow_slow_callbacks(reason): blocks the loop on purpose"]
        """
    )
    pytester.makepyfile(
        test_watched=textwrap.dedent(
            """
            import asyncio, time
            import pytest

            SPIN = (
                "import time\\nasync def step() -> None:\\n"
                "    end = time.thread_time() + 0.03\\n"
                "    while time.thread_time() < end: pass\\n"
            )

            def block() -> None:  # 30 ms of work: a sleep uses no CPU and is not counted
                end = time.thread_time() + 0.03
                while time.thread_time() < end:
                    pass

            async def test_quick() -> None:
                await asyncio.sleep(0)

            async def test_own_body_may_block() -> None:
                block()
                await asyncio.sleep(0)

            async def test_own_helper_task_may_block() -> None:
                async def helper() -> None:
                    block()
                await asyncio.create_task(helper())

            async def test_a_slow_callback_fails() -> None:
                asyncio.get_running_loop().call_soon(block)
                await asyncio.sleep(0.05)

            async def test_a_slow_timer_fails() -> None:
                asyncio.get_running_loop().call_later(0.001, block)
                await asyncio.sleep(0.05)

            async def test_a_slow_library_task_fails() -> None:
                import os, aiotimer
                where = os.path.join(os.path.dirname(aiotimer.__file__), "_elsewhere.py")
                library = SPIN
                code = {}
                exec(compile(library, where, "exec"), code)
                await asyncio.create_task(code["step"]())

            async def test_another_packages_machinery_is_not_counted() -> None:
                other = SPIN
                code = {}
                exec(compile(other, "/elsewhere/library.py", "exec"), code)
                await asyncio.create_task(code["step"]())

            @pytest.mark.allow_slow_callbacks("blocks on purpose")
            async def test_a_slow_callback_may_be_allowed() -> None:
                asyncio.get_running_loop().call_soon(block)
                await asyncio.sleep(0.05)

            async def test_an_exception_in_a_callback_fails() -> None:
                asyncio.get_running_loop().call_soon(lambda: 1 / 0)
                await asyncio.sleep(0.01)

            async def test_a_task_exception_never_retrieved_fails() -> None:
                async def boom() -> None:
                    raise ValueError("never retrieved")
                task = asyncio.create_task(boom())
                await asyncio.sleep(0.01)
                del task

            async def test_an_exception_at_loop_shutdown_fails() -> None:
                async def stubborn() -> None:
                    try:
                        await asyncio.sleep(600)
                    except asyncio.CancelledError:
                        raise ValueError("at shutdown")
                pending.append(asyncio.create_task(stubborn()))
                await asyncio.sleep(0)

            pending = []
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    passed = {
        "test_quick",
        "test_own_body_may_block",
        "test_own_helper_task_may_block",
        "test_a_slow_callback_may_be_allowed",
        "test_another_packages_machinery_is_not_counted",
    }
    failed = {
        "test_a_slow_callback_fails": "ran longer than 10 ms",
        "test_a_slow_timer_fails": "ran longer than 10 ms",
        "test_a_slow_library_task_fails": "[aiotimer] ",
        "test_an_exception_in_a_callback_fails": "ZeroDivisionError",
        "test_a_task_exception_never_retrieved_fails": "never retrieved",
        "test_an_exception_at_loop_shutdown_fails": "during asyncio.run() shutdown",
    }
    # A test failed by the watch passed its call and errs at teardown.
    result.assert_outcomes(passed=2 * (len(passed) + len(failed)), errors=2 * len(failed))
    out = result.stdout.str()
    for loop in ("asyncio", "uvloop"):
        for name in passed:
            assert f"ERROR test_watched.py::{name}[{loop}]" not in out
        for name, why in failed.items():
            assert f"ERROR test_watched.py::{name}[{loop}]" in out
            assert why in out
