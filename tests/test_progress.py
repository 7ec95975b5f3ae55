"""progress.bar: plain lines where stderr is not a terminal, nothing with quiet."""

import io

from dsimagenet.progress import Lines, bar


def test_plain_lines_at_each_tenth_and_the_end():
    f = io.StringIO()
    with bar(20, "sweep", unit="run", file=f) as b:
        assert isinstance(b, Lines)  # a StringIO is not a terminal
        for _ in range(20):
            b.update(1)
            b.set_postfix_str("ok")
    lines = f.getvalue().splitlines()
    # 10 steps of 10% (runs 2, 4, ..., 20); the end was one of them, so close() adds nothing
    assert len(lines) == 10, lines
    assert lines[0].startswith("sweep: 2/20 run (10%)") and lines[-1].startswith("sweep: 20/20 run (100%)")
    assert "ETA" not in lines[-1] and lines[-1].endswith("ok")


def test_unknown_total_prints_at_close_and_quiet_prints_nothing():
    f = io.StringIO()
    b = bar(None, "tune", unit="trial", file=f, every=1e9)
    b.update(3)
    assert f.getvalue() == ""
    b.close()
    assert f.getvalue().startswith("tune: 3 trial,")
    q = io.StringIO()
    with bar(5, "x", quiet=True, file=q) as b:
        b.update(5)
    assert q.getvalue() == ""
