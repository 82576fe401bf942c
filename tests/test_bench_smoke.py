"""Smoke runs of the benchmarks (benchmarks/bench.py --quick, benchmarks/passes.py) into a temporary directory."""
import csv
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench, passes, report  # noqa: E402


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ["--device", "--dtype", "--modules", "--backends", "--formats", "--modes", "--shapes", "--quick",
                   "--no-compile", "--no-e2e", "--output", "--repeats", "--min-time", "--threads", "--e2e-batch",
                   "--e2e-size", "--e2e-depth", "--gpu-rep-ms"]:
        assert option in text, option


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_results(tmp_path, restore_threads):
    out = tmp_path / "results"
    result = bench.main(["--quick", "--no-compile", "--threads", "1", "--shapes", "2x32x6x7", "--e2e-depth", "18",
                         "--e2e-size", "32", "--e2e-attention", "cbam", "--output", str(out), "--tag", "smoke"])
    paths = result["paths"]
    for key in ("ops_csv", "e2e_csv", "json"):
        assert os.path.exists(paths[key]), key
    assert paths["ops_csv"] == str(out / "smoke_ops.csv")

    ops = read_csv(paths["ops_csv"])
    assert ops and list(ops[0]) == report.META_COLUMNS + report.OP_COLUMNS
    assert {r["module"] for r in ops} == {"cbam", "bam", "se"}
    assert {r["format"] for r in ops} == {"nchw", "channels_last"}
    assert {r["mode"] for r in ops} == {"fwd", "fwdbwd"}
    impls = {r["impl"] for r in ops}
    assert {"eager", "clone"} <= impls and "compile" not in impls
    assert any(i.startswith("fused:") for i in impls)
    assert not [r for r in ops if r["error"]], [r["error"] for r in ops if r["error"]]
    for r in ops:
        assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and "benchmarks.bench" in r["command"]
        if r["impl"] != "clone":
            assert float(r["speedup_vs_eager"]) > 0 and float(r["x_floor"]) > 0
        if r["mode"] == "fwdbwd" and r["impl"] != "clone":
            assert float(r["saved_ratio"]) > 0
    fused_cbam = [r for r in ops if r["module"] == "cbam" and r["impl"].startswith("fused") and r["mode"] == "fwdbwd"]
    assert fused_cbam and all(float(r["saved_extra_ratio"]) < 0.5 for r in fused_cbam)  # never a full-size x1

    e2e = read_csv(paths["e2e_csv"])
    assert e2e and list(e2e[0]) == report.META_COLUMNS + report.E2E_COLUMNS
    assert {r["attention"] for r in e2e} == {"none", "cbam"}
    assert {r["mode"] for r in e2e} == {"inference", "train_step"}
    assert all(r["overhead_pct"] != "" for r in e2e if r["attention"] == "cbam")

    with open(paths["json"]) as f:
        payload = json.load(f)
    for key in ("timestamp", "device_name", "torch", "triton", "command", "threads"):
        assert key in payload["meta"], key
    assert len(payload["ops"]) == len(ops) and len(payload["e2e"]) == len(e2e)
    assert payload["config"]["shapes"]
    plots = paths.get("plots", [])
    assert plots and all(os.path.getsize(p) > 0 for p in plots)


def test_passes_run_writes_every_pass(tmp_path, restore_threads):
    result = passes.main(["--shapes", "2x16x5x6", "--repeats", "1", "--min-time", "0", "--threads", "1",
                          "--output", str(tmp_path)])
    rows = result["rows"]
    names = {r["pass"] for r in rows}
    for name in ("read", "clone", "add", "channel_pool", "spatial_pool", "apply_gates", "spatial_gate_grad",
                 "channel_gate_grad", "cbam_input_grad", "bam_combine product", "bam_combine_backward sum"):
        assert name in names, name
    assert {r["format"] for r in rows} == {"nchw", "channels_last"}
    assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert read_csv(result["paths"]["csv"])[0]["command"].endswith("--output " + str(tmp_path))
