"""benchmarks/profile_step.py runs on the CPU and accounts for the step's time by kind."""

import json

import pytest

from benchmarks.profile_step import kind_of, main


@pytest.mark.parametrize("name, kind", [
    ("_backward_edge_kernel", "attention kernels"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32", "matrix products"),
    ("aten::bmm", "matrix products"),
    ("void at::native::indexSelectLargeIndex<float, long>", "gathers and scatters"),
    ("aten::scatter_add_", "gathers and scatters"),
    ("aten::mul", "other"),
])
def test_kernels_are_sorted_into_kinds(name, kind):
    assert kind_of(name) == kind


def test_smoke_run_writes_a_profile_whose_kinds_add_up(tmp_path):
    main(["--smoke", "--modes", "conservative", "--out", str(tmp_path)])
    profile = json.loads((tmp_path / "step_profile.json").read_text())["profiles"]["conservative"]
    assert profile["total_ms"] > 0
    assert sum(profile["kinds_ms"].values()) == pytest.approx(profile["total_ms"])
    assert profile["kinds_ms"]["matrix products"] > 0
