"""Every results file names the commit and, when one is set, the attention launch-table override."""

from benchmarks.common import environment
from e2former_calc.provenance import COMMIT_ENV
from kernels.neighbor_attention import CONFIG_ENV


def test_the_launch_table_override_is_recorded(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "forward=16x4,source=32x4")
    monkeypatch.setenv(COMMIT_ENV, "c275cef")
    record = environment()
    assert record[CONFIG_ENV] == "forward=16x4,source=32x4" and record["commit"] == "c275cef"


def test_no_override_no_entry(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert CONFIG_ENV not in environment()
