"""Style, content and copying measured while training; the pick, `NAME-best.safetensors`, the
report's section, the disk they take, and `stylelora pick` recomputing the same from the run
folder and showing it in the report."""

from __future__ import annotations

import json

from conftest import training_config
from PIL import Image
from safetensors import safe_open

from stylelora.sample.pick_run import pick_run
from stylelora.train.measuring import measured_adapter, measurements_left
from stylelora.train.trainer import train


def test_a_run_measures_picks_and_pick_recomputes_the_same(
    tiny_sd15_dir, demo_subset, tmp_path
) -> None:
    cfg = training_config(
        tmp_path, tiny_sd15_dir, demo_subset(4),
        "train.max_steps=4", "train.learning_rate=1e-2", "train.log_with='none'",
        "train.checkpoint_every_n_steps=2", "validation.measure=true",
        "validation.measure_every_n_steps=0", "validation.measure_prompts=2",
        "validation.measure_steps=2",
    )  # fmt: skip
    train(cfg)
    run = cfg.output_dir
    events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    measured = [e for e in events if e["event"] == "measure"]
    assert [e["step"] for e in measured] == [2, 4]  # at each checkpoint, the last one too
    for event in measured:
        assert (run / event["path"]).is_file()
        assert 0 <= event["copying"] <= 1 and -1 <= event["content"] <= 1
    phases = {e["phase"] for e in events if e["event"] == "phase"}
    assert "measuring" in phases
    (picked,) = [e for e in events if e["event"] == "pick"]
    best = run / f"{cfg.name}-best.safetensors"
    with safe_open(str(best), "pt") as handle:
        header = handle.metadata()
    assert header["stylelora_best_step"] == str(picked["step"])
    assert header["stylelora_best_reason"] == picked["reason"]
    report = (run / "report.html").read_text()
    assert "Style, content and copying" in report and f"step {picked['step']} (picked)" in report
    assert (run / "report" / "measures.png").is_file()

    # A checkpoint at a measured step names the measured adapter file, not a second copy.
    checkpoint_file = run / "checkpoints" / "step-000002" / f"{cfg.name}-step-000002.safetensors"
    measured_file = measured_adapter(run, cfg.name, 2)
    assert checkpoint_file.stat().st_ino == measured_file.stat().st_ino

    best.unlink()
    (run / "measures" / "step-000004.png").unlink()
    lines: list[str] = []
    pick_run(run, say=lines.append)
    assert any("updated" in line and "report.html" in line for line in lines)
    assert (run / "measures" / "step-000004.png").is_file()  # the renders it measured
    report = (run / "report.html").read_text()
    assert "picked again by `stylelora pick`" in report
    assert f"step {picked['step']} (picked)" in report and "Loss and learning rate" in report
    again = json.loads((run / "measures" / "pick.json").read_text())
    assert again["step"] == picked["step"]
    for one, other in zip(measured, again["measures"], strict=True):
        assert one["style"] == other["style"] and one["content"] == other["content"]
    with safe_open(str(best), "pt") as handle:
        assert handle.metadata()["stylelora_best_step"] == str(picked["step"])

    # --prompts and --steps: fewer renders, each row one picture wide instead of two
    two_wide = Image.open(run / "measures" / "step-000004.png").size
    pick_run(run, say=lines.append, prompts=1, steps=1)
    one_wide = Image.open(run / "measures" / "step-000004.png").size
    assert one_wide[0] * 2 == two_wide[0] and one_wide[1] == two_wide[1]


def test_measurements_left_counts_each_measured_step_once(tmp_path, tiny_sd15_dir):
    def left(step: int, *overrides: str) -> int:
        settings = ("train.max_steps=1000", "validation.measure_every_n_steps=250", *overrides)
        return measurements_left(
            step, training_config(tmp_path, tiny_sd15_dir, tmp_path, *settings)
        )

    assert left(0, "train.checkpoint_every_n_steps=0") == 4
    assert left(0, "train.checkpoint_every_n_steps=100") == 10 + 2  # 250 and 750 between
    assert left(0, "train.checkpoint_every_n_steps=300") == 4 + 3  # 300, 600, 900 besides
    assert left(600, "train.checkpoint_every_n_steps=0") == 2
    assert left(1000, "train.checkpoint_every_n_steps=0") == 0
    assert left(0, "train.checkpoint_every_n_steps=0", "validation.measure_every_n_steps=0") == 1
    # 250, 500 (a checkpoint too), 750, and the last step
    assert left(0, "train.max_steps=999", "train.checkpoint_every_n_steps=500") == 3 + 1
    # counted, not visited: a run of 10^12 steps is counted at once
    assert left(0, "train.max_steps=1000000000000", "train.checkpoint_every_n_steps=0") == 4 * 10**9
