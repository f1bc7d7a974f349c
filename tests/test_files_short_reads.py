"""``read_bytes`` believes the bytes it reads, not the size the OS reports.

Linux's /proc files are regular files that report a size of 0 and hold text: the
real case of a size that is wrong.  A file that shrinks after it was measured is
the other (the size is made to lie through ``os.fstat``, as a race would make it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from opswitch.core import files
from opswitch.core.errors import ConfigError

PROC = Path("/proc/self/cmdline")
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's /proc")


@needs_proc
def test_a_file_that_reports_size_0_is_read_whole():
    assert os.stat(PROC).st_size == 0
    expected = PROC.read_bytes()
    assert expected, "this process has a command line"
    assert files.read_bytes(PROC, what="config", limit=files.CONFIG_LIMIT, error=ConfigError) == expected


@needs_proc
def test_the_limit_holds_for_the_bytes_read_when_the_size_says_0():
    limit = len(PROC.read_bytes()) - 1
    with pytest.raises(ConfigError, match="more than any config file"):
        files.read_bytes(PROC, what="config", limit=limit, error=ConfigError)


def _lying_fstat(monkeypatch, extra: int) -> None:
    """``os.fstat`` reports ``extra`` bytes more than the file holds (it shrank after the stat)."""
    real = os.fstat

    def fstat(fd):
        st = real(fd)
        fields = list(st)
        fields[6] = st.st_size + extra  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat)


@pytest.mark.parametrize("extra", [1, 5000])
def test_a_file_shorter_than_its_reported_size_gives_what_it_holds(tmp_path, monkeypatch, extra):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"n_layer": 2}')
    _lying_fstat(monkeypatch, extra)
    got = files.read_bytes(path, what="config", limit=files.CONFIG_LIMIT, error=ConfigError)
    assert got == b'{"n_layer": 2}'
