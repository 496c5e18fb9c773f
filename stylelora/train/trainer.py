"""The training run: set-up, one loop of steps with previews and checkpoints, then the export.

Everything random is drawn from generators derived from (seed, position), never from global
state, so the same config gives the same adapter and a resume lands on the exact step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from stylelora.config import Config
from stylelora.export.metadata import training_metadata
from stylelora.families.base import ModelFamily
from stylelora.sample.preview import Previewer
from stylelora.train.checkpoint import check_fresh_start
from stylelora.train.guard import NonFiniteStop, StopRequest
from stylelora.train.measuring import build_measurer
from stylelora.train.profile import StepProfile, timed
from stylelora.train.run import TrainingRun, backward_pass, build_run
from stylelora.train.session import RunResult, Session

__all__ = ["RunResult", "train"]


def train(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    family: ModelFamily | None = None,
    profile: StepProfile | None = None,
) -> RunResult:
    """Train the adapter `cfg` describes and write it to `<output_dir>/<name>.safetensors`.

    `resume`: "latest" or a checkpoint folder to continue from. A SIGINT or SIGTERM saves a
    checkpoint and returns a result with `interrupted` set, without exporting. `overwrite`: a
    new run may replace the adapter an earlier run left in the folder. `family`: an already
    loaded model instead of `cfg.model`; `profile`: times the loop's phases (benchmarks).
    """
    if resume is None:
        check_fresh_start(cfg.output_dir, adapter_files(cfg), overwrite)
    run = build_run(cfg, family)
    session = Session(
        run=run,
        previewer=Previewer(run.family, run.prompts, cfg.sample.scheduler) if run.prompts else None,
        metadata=lambda steps, epochs: training_metadata(
            cfg,
            run.scan,
            run.family,
            steps,
            epochs,
            run.started,
            time.time(),
            run.caches.latents,
            run.priors,
        ),  # fmt: skip
        measurer=build_measurer(run.family, cfg, run.prompts, run.scan.records),
    )
    try:
        return run_session(session, run, resume, profile)
    finally:
        session.close()


def run_session(
    session: Session, run: TrainingRun, resume: str | None, profile: StepProfile | None = None
) -> RunResult:
    """Resume if asked, loop, then export; a signal returns early, after a checkpoint."""
    session.begin(resume)
    with StopRequest() as stop:  # through the export too: a signal there lets it finish
        try:
            with profile or nullcontext():
                loop(session, run, stop)
        except NonFiniteStop as exc:
            session.export()
            session.report(f"stopped: {exc}")
            message = f"{exc}; {session.adapter_path} holds the last good weights"
            raise NonFiniteStop(message) from None
        return session.finish(stop)


def loop(session: Session, run: TrainingRun, stop: StopRequest) -> None:
    """Steps until `max_steps`, a stop signal, or too many non-finite steps in a row."""
    state = session.state
    while not session.done:
        for batch in timed(session.epoch_batches(), "data"):
            loss = backward_pass(run, batch, state.draws)
            stepped = session.optimizer_step(loss)
            state.draws += 1
            state.position += 1
            if stepped:
                session.after_step(stop)
            if session.done:
                break
        else:
            session.end_epoch()


def adapter_files(cfg: Config) -> list[Path]:
    """The files a run's export writes (the EMA file only with `ema_export = "beside"`)."""
    adapter = cfg.output_dir / f"{cfg.name}.safetensors"
    return [adapter, adapter.with_name(f"{cfg.name}-ema.safetensors")]
