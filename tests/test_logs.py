"""Run logs: TensorBoard tags and metrics.jsonl rows as the train CLI writes them."""

import json

from facenet_jax import logs


def test_tensorboard_tags_keep_legal_names_and_replace_the_rest():
    assert logs.tensorboard_tag("loss") == "loss"
    assert logs.tensorboard_tag("eval/val@far=1e-3_std") == "eval/val_far_1e-3_std"
    assert logs.tensorboard_tag("eval/map@r") == "eval/map_r"
    assert logs.tensorboard_tag("eval/recall@10") == "eval/recall_10"


def test_rows_written_as_json_with_null_for_non_finite_and_truncated_on_resume(tmp_path):
    writer = logs.MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"loss": 0.5, "eval/val@far=1e-3": 0.25})
    writer.write(2, {"loss": float("nan")})
    writer.write(3, {"loss": float("inf")})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / logs.METRICS_FILE).read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "eval/val@far=1e-3": 0.25},
                    {"step": 2, "loss": None}, {"step": 3, "loss": None}]
    logs.truncate_metrics(tmp_path, 2)
    assert [row["step"] for row in logs.read_metrics(tmp_path)] == [1, 2]
    assert list((tmp_path / "tensorboard").iterdir())


def test_writer_on_other_processes_writes_nothing(tmp_path):
    writer = logs.MetricsWriter(tmp_path, enabled=False)
    writer.write(1, {"loss": 0.5})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_the_writer_leaves_torch_unimported_and_importable(tmp_path):
    """tensorboardX imports torch when it is installed; a run's writer must not pay for it (a
    fresh interpreter: this one may hold torch already), and torch must import afterwards."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("torch", reason="without torch installed there is nothing to avoid")
    script = ("import sys\nfrom facenet_jax import logs\n"
              f"logs.MetricsWriter({str(tmp_path)!r}).write(1, {{'loss': 0.5}})\n"
              "print('torch' in sys.modules)\nimport torch\nprint(torch.zeros(1).item())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "0.0"]
    assert list((tmp_path / "tensorboard").iterdir())
