"""``conveyor bench``: the table and the verdict (the real experiments take ~10 s and are not
run here; their parts are replaced by stand-ins)."""

from __future__ import annotations

import pytest

from conveyor import _bench
from conveyor._cli import main


def _fail() -> None:
    raise RuntimeError("backend not ready\nsecond line")


def _standins(cpus: int) -> list[tuple[str, list[tuple[str, object]]]]:
    return [
        ("fib: computing", [("conveyor threads", lambda: None), ("conveyor processes", _fail)]),
        ("sleep: waiting", [("conveyor threads", lambda: None), ("conveyor processes", _fail)]),
        (
            "abs: cost per call",
            [("conveyor threads", lambda: None), ("stdlib ThreadPoolExecutor", lambda: None)],
        ),
    ]


def test_a_failed_part_is_reported_in_its_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_bench, "_experiments", _standins)
    assert main(["bench"]) == 1
    out = capsys.readouterr().out
    assert "conveyor processes                 failed: RuntimeError: backend not ready" in out
    assert "second line" not in out
    assert "verdict: here, computing -> threads only: the process backend failed here" in out


def test_the_verdict_names_the_backend_for_each_kind_of_work() -> None:
    def rows(work: str, **seconds: float) -> list[_bench._Row]:
        return [_bench._Row(work, name.replace("_", " "), s) for name, s in seconds.items()]

    verdict = _bench._verdict(
        [
            rows("cpu", conveyor_threads=4.0, conveyor_processes=1.0),
            rows("wait", conveyor_threads=0.1, conveyor_processes=0.3),
            rows("tiny", conveyor_threads=0.01, stdlib_ThreadPoolExecutor=1.0),
        ],
        4,
    )
    assert verdict == (
        "verdict: here, computing -> processes (4.0x faster than threads on 4 CPUs); "
        "waiting -> threads (3.0x the speed of processes, which must start first); "
        "tiny calls: conveyor's map 100x the stdlib threads'."
    )


def test_the_experiments_cover_both_backends_and_the_stdlib() -> None:
    names = [name for _, runners in _bench._experiments(2) for name, _ in runners]
    for expected in ("conveyor threads", "conveyor processes", "stdlib ProcessPoolExecutor"):
        assert any(name.startswith(expected) for name in names)
