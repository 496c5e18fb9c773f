"""Validation on held-out images at fixed timesteps and noise: curves of different runs compare."""

from __future__ import annotations

from conftest import training_config

from stylelora.train.trainer import train


def run(tmp_path, name, model, data, *more):
    cfg = training_config(
        tmp_path / name,
        model,
        data,
        "train.max_steps=4",
        "train.learning_rate=1e-2",
        "train.log_with='none'",
        "validation.split=0.25",
        "validation.every_n_steps=2",
        *more,
    )
    return train(cfg)


def test_validation_curves_of_different_runs_start_from_the_same_point(
    tiny_sd15_dir, demo_subset, tmp_path, capsys
):
    data = demo_subset(8)
    first = run(tmp_path, "a", tiny_sd15_dir, data)
    assert "validation: 2 held-out image(s)" in capsys.readouterr().out
    # Another training seed and other loss options: the same held-out set, noise and timesteps.
    second = run(
        tmp_path, "b", tiny_sd15_dir, data, "seed=7", "train.min_snr_gamma=5.0",
        "train.noise_offset=0.1", "train.loss_type='huber'",
    )  # fmt: skip
    assert [step for step, _ in first.validation] == [0, 2, 4]
    assert first.validation[0] == second.validation[0]  # the untrained model, measured alike
    assert first.validation[-1] != second.validation[-1]  # and the runs did differ
    assert first.validation[-1][1] < first.validation[0][1]


def test_a_validation_folder_is_held_out_entirely(tiny_sd15_dir, demo_subset, tmp_path, capsys):
    result = run(
        tmp_path, "dir", tiny_sd15_dir, demo_subset(4),
        "validation.split=0.0", f"validation.dir={str(demo_subset(3, start=10))!r}",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "dataset: 4 images" in out and "validation: 3 held-out image(s)" in out
    assert len(result.validation) == 3
