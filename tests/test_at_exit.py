"""transport.kit.AtExit: what a program that forgot aclose() leaves open is
settled at exit, within one bound for all, whatever one of them raises."""

from __future__ import annotations

import subprocess
import sys
import time

from transport.kit import AtExit


def test_run_settles_what_is_left_within_one_deadline_then_runs_then() -> None:
    seen: list[tuple[str, float]] = []
    order: list[str] = []

    def settle(item: str, deadline: float) -> None:
        seen.append((item, deadline))
        order.append(item)
        if item == "b":
            raise RuntimeError("a failing settle does not stop the others")

    hook: AtExit[str] = AtExit(2.0, settle, then=lambda: order.append("then"))
    for item in ("a", "b", "c", "gone"):
        hook.add(item)
    hook.discard("gone")
    assert "a" in hook and "gone" not in hook and len(hook) == 3
    before = time.monotonic()
    hook.run()
    assert sorted(item for item, _ in seen) == ["a", "b", "c"]
    assert len({deadline for _, deadline in seen}) == 1  # one bound for all
    assert before + 2.0 <= seen[0][1] <= time.monotonic() + 2.0
    assert order[-1] == "then"


def test_it_runs_at_interpreter_exit() -> None:
    script = (
        "from transport.kit import AtExit\n"
        "hook = AtExit(1.0, lambda item, deadline: print('settled', item), then=lambda: print('then'))\n"
        "hook.add('x')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["settled x", "then"]
