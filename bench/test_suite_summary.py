"""bench/suite_summary.py: the stage table and the exit status of bench/gpu_suite.sh."""
import json

from suite_summary import main, stage_rows


def _out(tmp_path, stages, results=None):
    (tmp_path / ".stages").write_text("\n".join(stages) + "\n")
    if results is not None:
        (tmp_path / "e2e_gpu.json").write_text(json.dumps(results))
    return tmp_path


RESULTS = {"environment": {"device": "GPU"}, "targets": [
    {"target": "t", "attn": "sdpa", "preset": "v2", "status": "PASS", "detail": "1.2 x"}]}


def test_stage_statuses_name_what_happened(tmp_path):
    out = _out(tmp_path, ["a 0 3 10", "b 124 10 10", "c 2 1 10", "d skipped 0 10"])
    assert [s for _, s, _ in stage_rows(out)] == ["PASS", "FAIL (time limit)", "FAIL (exit 2)", "SKIP (needs CUDA)"]


def test_exit_status_fails_on_a_failed_stage_or_missing_results(tmp_path, capsys):
    assert main([str(_out(tmp_path, ["a 0 3 10", "d skipped 0 10"], RESULTS)), "gpu"]) == 0
    assert "[        PASS] t [sdpa v2]: 1.2 x" in capsys.readouterr().out
    assert main([str(_out(tmp_path, ["a 124 10 10"], RESULTS)), "gpu"]) == 1
    (tmp_path / "e2e_gpu.json").unlink()
    assert main([str(_out(tmp_path, ["a 0 3 10"])), "gpu"]) == 1
