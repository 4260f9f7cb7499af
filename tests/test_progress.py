"""The live status line: what it says, when it redraws, how it goes away."""

from __future__ import annotations

import io
import re

import pytest

import conveyor
from conveyor._progress import Progress, Tracked, length_of, track


def _draws(stream: io.StringIO) -> list[str]:
    return stream.getvalue().split("\r")


def test_render_with_a_total() -> None:
    progress = Progress(total=200, stream=io.StringIO())
    progress.advance(50, failed=2)
    text = progress.render()
    assert re.fullmatch(r"50/200 25% \| [\d.]+/s \| ETA \d+:\d\d \| 2 failed", text), text


def test_render_without_a_total_and_at_the_end() -> None:
    progress = Progress(stream=io.StringIO())
    progress.advance(7)
    assert re.fullmatch(r"7 done \| [\d.]+/s \| \d+:\d\d so far", progress.render())
    finished = Progress(total=3, stream=io.StringIO(), label="fetch")
    finished.advance(3)
    assert re.fullmatch(r"fetch 3/3 100% \| [\d.]+/s \| took \d+:\d\d", finished.render())


def test_an_empty_total() -> None:
    progress = Progress(total=0, stream=io.StringIO())
    assert progress.render().startswith("0/0 |")


def test_redraws_are_limited_by_the_interval() -> None:
    stream = io.StringIO()
    progress = Progress(total=1000, stream=stream, interval=3600)
    for _ in range(1000):
        progress.advance()
    assert _draws(stream) == ["", "1/1000 0% | " + _draws(stream)[1].split(" | ", 1)[1]]


def test_every_advance_draws_with_no_interval() -> None:
    stream = io.StringIO()
    progress = Progress(total=3, stream=stream, interval=0)
    for _ in range(3):
        progress.advance()
    assert [d.split(" ")[0] for d in _draws(stream)[1:]] == ["1/3", "2/3", "3/3"]


def test_a_shorter_line_wipes_the_longer_one_and_close_wipes_all() -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=0)
    progress.advance(1, failed=1)
    long = len(_draws(stream)[-1])
    progress.failed = 0
    progress.draw()
    last = _draws(stream)[-1]
    assert len(last) == long  # padded with spaces over the old text
    progress.close()
    # What is left on screen past the shorter text is spaces already.
    wipe = "\r" + " " * len(last.rstrip()) + "\r"
    assert stream.getvalue().endswith(wipe)
    progress.advance()  # closed: draws nothing more
    assert stream.getvalue().endswith(wipe)


def test_a_broken_stream_does_not_fail_the_work() -> None:
    stream = io.StringIO()
    stream.close()
    with Progress(stream=stream, interval=0) as progress:
        progress.advance()


def test_length_of() -> None:
    assert length_of([1, 2], range(5)) == 2
    assert length_of([1], (x for x in [1])) is None
    assert length_of() is None


def test_track_counts_and_wipes() -> None:
    stream = io.StringIO()
    assert list(track(["a", "b"], stream=stream)) == ["a", "b"]
    assert _draws(stream)[1].startswith("1/2 50%")
    assert stream.getvalue().endswith("\r")


def test_track_counts_a_raised_error_as_a_failure() -> None:
    def items() -> object:
        yield 1
        raise ValueError("bad")

    stream = io.StringIO()
    tracked = track(items(), total=2, stream=stream)  # type: ignore[call-overload]
    assert next(tracked) == 1
    with pytest.raises(ValueError, match="bad"):
        next(tracked)
    assert tracked.progress.failed == 1
    assert stream.getvalue().endswith("\r")


def test_close_closes_the_inner_iterator() -> None:
    closed = []

    def items() -> object:
        try:
            yield from range(10)
        finally:
            closed.append(True)

    tracked = Tracked(items(), Progress(stream=io.StringIO()))  # type: ignore[arg-type]
    next(tracked)
    tracked.close()
    assert closed == [True]


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_pool_maps_report_progress_on_stderr(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with conveyor.Pool(workers=2) as pool:
        results = getattr(pool, method)(abs, range(-50, 0), progress=True)
        assert sorted(results) == list(range(1, 51))
    err = capsys.readouterr().err
    assert err.startswith("\r1/50 2%")  # the total comes from len()
    assert err.endswith("\r")


def test_pool_map_without_progress_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with conveyor.Pool(workers=2) as pool:
        assert list(pool.map(abs, [-1])) == [1]
    assert capsys.readouterr().err == ""


def test_pool_map_progress_without_a_length(capsys: pytest.CaptureFixture[str]) -> None:
    with conveyor.Pool(workers=2) as pool:
        assert sum(pool.imap(abs, iter(range(5)), progress=True)) == 10
    assert capsys.readouterr().err.startswith("\r1 done")


def test_pool_map_progress_counts_the_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with conveyor.Pool(workers=2) as pool, pytest.raises(ValueError):
        list(pool.map(int, ["1", "x"], progress=True))
    assert capsys.readouterr().err.endswith("\r")


def test_pipeline_progress_counts_outputs_of_a_known_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with conveyor.Pipeline(range(-20, 0), progress=True) as pipeline:
        assert sorted(pipeline.map(abs, workers=2)) == list(range(1, 21))
    err = capsys.readouterr().err
    assert err.startswith("\rpipeline 1/20 5%")
    assert err.endswith("\r")


def test_pipeline_progress_has_no_total_when_a_stage_filters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pipeline = conveyor.Pipeline(range(10), progress=True).filter(lambda x: x % 2 == 0)
    assert list(pipeline) == [0, 2, 4, 6, 8]
    assert capsys.readouterr().err.startswith("\rpipeline 1 done")


def test_pipeline_progress_counts_collected_failures(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = conveyor.Pipeline(["1", "x", "3"], errors="collect", progress=True).map(int)
    summary = pipeline.run()
    assert summary.outputs == 3
    assert len(summary.errors) == 1
    err = capsys.readouterr().err
    assert "| 1 failed" in err
    assert err.endswith("\r")
