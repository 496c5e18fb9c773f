"""Style, content and copying measured while training; the pick, `NAME-best.safetensors`, the
report's section, and `stylelora pick` recomputing the same from the run folder."""

from __future__ import annotations

import json

from conftest import training_config
from safetensors import safe_open

from stylelora.sample.pick_run import pick_run
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

    best.unlink()
    pick_run(run, say=lambda line: None)
    again = json.loads((run / "measures" / "pick.json").read_text())
    assert again["step"] == picked["step"]
    for one, other in zip(measured, again["measures"], strict=True):
        assert one["style"] == other["style"] and one["content"] == other["content"]
    with safe_open(str(best), "pt") as handle:
        assert handle.metadata()["stylelora_best_step"] == str(picked["step"])
