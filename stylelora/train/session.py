"""What a run does around its steps: the optimizer step and its guard, logging, validation,
previews, the report, checkpoints, resuming and the export. The loop in `trainer.py` calls these.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stylelora.errors import first_line
from stylelora.export.atomic import atomic_path
from stylelora.export.lora_file import save_lora_file
from stylelora.sample.preview import Previewer
from stylelora.sample.report import ReportData, write_report
from stylelora.train.checkpoint import (
    Checkpointer,
    TrainState,
    check_free_space,
    config_changes,
    find_checkpoint,
    flat_config,
)
from stylelora.train.ema import AdapterEMA
from stylelora.train.guard import NonFiniteGuard, StopRequest, inject_fault, step_is_finite
from stylelora.train.measuring import (
    Measurer,
    keep_best,
    measure_due,
    measured_adapter,
    measurements_left,
    take_measures,
    was_measured,
)
from stylelora.train.placement import visiting
from stylelora.train.profile import host_read, phase, step_done
from stylelora.train.progress import ProgressLog
from stylelora.train.run import (
    TrainingRun,
    clip_gradients,
    full_adapter_weights,
    optimizer_step,
)
from stylelora.train.validation import validation_loss


@dataclass
class RunResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    ema_path: Path | None = None
    skipped: int = 0
    validation: list[tuple[int, float]] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None


def trainable(adapted: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {
        f"{prefix}.{name}": param
        for prefix, module in adapted.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process: every process must take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(total.item() > 0)


@dataclass
class Session:
    run: TrainingRun
    previewer: Previewer | None
    metadata: Callable[[int, int], dict[str, str]]  # (steps, epochs) -> the file's header
    measurer: Measurer | None = None
    state: TrainState = field(default_factory=TrainState)
    stopping: bool = False
    window: list[torch.Tensor] = field(default_factory=list)  # this step's micro-batch losses

    def __post_init__(self) -> None:
        train = self.run.cfg.train
        self.params = trainable(self.run.adapted)
        self.ema = (
            AdapterEMA(list(self.params.values()), train.ema_decay) if train.ema_decay else None
        )
        self.checkpointer = Checkpointer(
            self.run.accelerator,
            self.run.cfg.output_dir,
            train.checkpoints_keep,
            self.params,
            self.ema,
        )
        self.guard = NonFiniteGuard(train.max_nonfinite_steps)
        # This session's steps began then; earlier sessions of a resumed run trained for
        # `seconds_before` (run.started is when this process set the run up, for the metadata).
        self.began, self.seconds_before = self.run.started, 0.0
        self.session_steps = 0
        self.progress: tqdm | None = None
        self.events = ProgressLog(self.run.cfg.output_dir, enabled=self.main)

    @property
    def main(self) -> bool:
        return self.run.accelerator.is_main_process

    def say(self, line: str) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    @contextmanager
    def side_task(self, what: str) -> Iterator[None]:
        """A preview, the report or a log that fails costs one line, never the run's adapter."""
        try:
            yield
        except Exception as exc:  # whatever broke, the training and the export go on
            self.say(f"warning: {what} failed, training goes on: {one_line(exc)}")

    # --- start -------------------------------------------------------------------------

    def begin(self, resume: str | None) -> None:
        """Resume if asked, check the disk, start the trackers, the progress bar, validation."""
        if resume:
            self.resume(find_checkpoint(self.run.cfg.output_dir, resume))
        self.began, self.seconds_before = time.time(), self.state.seconds
        if needed := self.disk_bytes():
            check_free_space(self.run.cfg.output_dir, needed)
        self.start_trackers()
        self.progress = tqdm(
            total=self.run.cfg.train.max_steps,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=not self.run.accelerator.is_local_main_process,
        )
        self.events.write("start", step=self.state.step, max_steps=self.run.cfg.train.max_steps)
        if self.run.validation and not self.state.validation:
            self.validate()

    def resume(self, folder: Path) -> None:
        state, scheduler, saved = self.checkpointer.load(folder)
        self.run.lr_scheduler.load_state_dict(scheduler)
        self.state = state
        self.guard = NonFiniteGuard(
            self.run.cfg.train.max_nonfinite_steps, state.skipped, state.skipped_in_a_row
        )
        self.say(
            f"resuming from {folder}: step {state.step}, epoch {state.epoch}, "
            f"batch {state.position} of the epoch"
        )
        changed = config_changes(saved, self.run.cfg)
        if changed:
            self.say(f"  settings changed since the checkpoint: {', '.join(changed[:8])}")

    def disk_bytes(self) -> int:
        """About what the run will add to its folder: `checkpoints_keep` checkpoints and one
        being written, and the adapter file of each measurement to come."""
        cfg = self.run.cfg
        adapter = sum(p.numel() * p.element_size() for p in self.params.values())
        needed = 0
        if cfg.train.checkpoint_every_n_steps:
            per_checkpoint = adapter * (3 + (1 if self.ema else 0)) + 2**20
            needed += per_checkpoint * (cfg.train.checkpoints_keep + 1)
        if self.measurer:
            needed += adapter * measurements_left(self.state.step, cfg)
        return needed

    def start_trackers(self) -> None:
        if self.run.cfg.train.log_with == "none":
            return
        kwargs = {"tensorboard": {"purge_step": self.state.step + 1}} if self.state.step else {}
        self.run.accelerator.init_trackers(
            self.run.cfg.name, config=flat_config(self.run.cfg), init_kwargs=kwargs
        )

    # --- each step ---------------------------------------------------------------------

    def epoch_batches(self) -> DataLoader:
        """This epoch's loader, past the batches a resumed run has already drawn."""
        self.run.sampler.set_epoch(self.state.epoch)
        if hasattr(self.run.loader, "set_epoch"):
            self.run.loader.set_epoch(self.state.epoch)  # accelerate re-sets the sampler's epoch
        if self.state.position:
            return self.run.accelerator.skip_first_batches(self.run.loader, self.state.position)
        return self.run.loader

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """At the end of an accumulation window: clip and step unless anything is non-finite.

        Returns whether an optimizer step was taken; a skipped one is counted, and
        `max_nonfinite_steps` of them in a row raise NonFiniteStop. A step the fp16 gradient
        scaler skips (it overflowed; the scaler lowers its scale) is not taken and not counted.
        """
        self.window.append(loss.detach())
        if not self.run.accelerator.sync_gradients:
            return False
        with phase("clip"):
            norm = clip_gradients(self.run)
        with phase("guard"):
            # one read for the progress bar's loss and the guard: a GPU waits at each read
            values = host_read(*self.window, *([] if norm is None else [norm]))
            finite = not any_process(self.run.accelerator, not step_is_finite(values))
        with phase("optimizer"):
            stepped = optimizer_step(self.run, finite)
        losses = values[: len(self.window)]
        self.window.clear()
        self.record_guard(finite)
        if stepped:
            self.state.losses.append(sum(losses) / len(losses))
        return stepped

    def record_guard(self, finite: bool) -> None:
        try:
            self.guard.record(finite, self.state.step)
        finally:
            self.state.skipped, self.state.skipped_in_a_row = (
                self.guard.skipped,
                self.guard.in_a_row,
            )

    def after_step(self, stop: StopRequest) -> None:
        """Everything that follows an optimizer step, each only when it is due."""
        cfg, state = self.run.cfg, self.state
        step_done()
        with phase("schedule"):
            self.run.lr_scheduler.step()
        if self.ema:
            with phase("ema"):
                self.ema.update()
        state.step += 1
        self.session_steps += 1
        state.lrs.append(self.run.lr_scheduler.get_last_lr()[0])
        with phase("logging"):
            self.log_step()
        if self.run.validation and state.step % cfg.validation.every_n_steps == 0:
            with phase("validation"):
                self.validate()
        if self.previewer and due(state.step, cfg.sample.every_n_steps, cfg.train.max_steps):
            with phase("preview"):
                self.preview()
        if self.measurer and measure_due(state.step, cfg):
            with phase("measures"):
                take_measures(self)
        inject_fault("interrupt", state.step)
        self.stopping = any_process(self.run.accelerator, stop.requested)
        if self.stopping or due(state.step, cfg.train.checkpoint_every_n_steps):
            with phase("checkpoint"):
                self.checkpoint()

    def end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.position = 0
        every = self.run.cfg.sample.every_n_epochs
        if self.previewer and every and self.state.epoch % every == 0:
            self.preview()

    @property
    def done(self) -> bool:
        return self.stopping or self.state.step >= self.run.cfg.train.max_steps

    def log_step(self) -> None:
        state = self.state
        values = {"loss": state.losses[-1], "lr": state.lrs[-1], "skipped_steps": state.skipped}
        with self.side_task(f"the log of step {state.step}"):
            self.run.accelerator.log(values, step=state.step)
            self.events.write(
                "step",
                step=state.step,
                max_steps=self.run.cfg.train.max_steps,
                loss=state.losses[-1],
                lr=state.lrs[-1],
                seconds=round(self.seconds_trained(), 3),
            )
        if self.progress is not None:
            self.progress.update(1)
            postfix = {"loss": f"{state.losses[-1]:.4f}", "lr": f"{state.lrs[-1]:.2e}"}
            if state.skipped:
                postfix["skipped"] = state.skipped
            self.progress.set_postfix(postfix)

    def validate(self) -> None:
        with self.events.phase("validating"):
            loss = validation_loss(
                self.run.family, self.run.unet, self.run.objective, self.run.validation
            )
        self.state.validation.append((self.state.step, loss))
        self.run.accelerator.log({"validation_loss": loss}, step=self.state.step)
        self.events.write("validation", step=self.state.step, loss=loss)
        self.say(f"step {self.state.step}: validation loss {loss:.5f}")

    def preview(self) -> None:
        step = self.state.step
        relative = f"samples/{self.run.cfg.name}_{step:06d}.png"
        # Every process records it: whether a preview is still due decides who waits where.
        if not self.state.previews or self.state.previews[-1][0] != step:
            self.state.previews.append((step, relative))
        if self.main:
            with self.side_task(f"the preview at step {step}"):
                due_images = self.previewer.images_due
                with (
                    self.events.phase("rendering previews", due_images) as rendered,
                    visiting(self.run.idle, self.run.accelerator.device),
                ):
                    sheet = self.previewer.render(rendered)
                with atomic_path(self.run.cfg.output_dir / relative) as tmp:
                    sheet.save(tmp, format="PNG")
                # the grid's rows, top to bottom: without the adapter left, with it right
                prompts = [prompt.prompt for prompt in self.previewer.prompts]
                self.events.write("preview", step=step, path=relative, prompts=prompts)
                self.log_image(sheet)
            self.report("running")
        self.run.accelerator.wait_for_everyone()

    def log_image(self, sheet) -> None:
        if self.run.cfg.train.log_with != "tensorboard":
            return
        tracker = self.run.accelerator.get_tracker("tensorboard")
        tracker.log_images(
            {"preview": np.asarray(sheet)[None]}, step=self.state.step, dataformats="NHWC"
        )

    def seconds_trained(self) -> float:
        """Seconds of training over every session of this run, to now."""
        return self.seconds_before + time.time() - self.began

    def checkpoint(self) -> Path:
        state = self.state
        state.seconds = self.seconds_trained()
        with self.events.phase("saving a checkpoint"):
            folder = self.checkpointer.save(
                state, self.run.lr_scheduler.state_dict(), self.run.cfg.model_dump(mode="json")
            )
            self.write_checkpoint_adapter(folder)
        self.say(f"checkpoint: step {state.step} saved to {folder}")
        return folder

    def write_checkpoint_adapter(self, folder: Path) -> None:
        """The adapter as the export would write it now, beside the checkpoint's state (which
        only a resume reads): a file to try or to use at that step."""
        cfg, step = self.run.cfg, self.state.step
        path = folder / checkpoint_adapter_name(cfg.name, step)
        with full_adapter_weights(self.run.accelerator, self.run.unet):
            if self.main:
                with self.side_task(f"the adapter file of step {step}"):
                    if self.link_measured_adapter(path):
                        return
                    with_ema = bool(self.ema) and cfg.train.ema_export == "instead"
                    self.write_adapter_file(path, self.file_metadata(), with_ema)

    def link_measured_adapter(self, path: Path) -> bool:
        """Where this step was measured, its adapter file is already written: `path` becomes a
        second name of that file (a hard link), not a second copy on the disk."""
        state = self.state
        if not was_measured(state.measures, state.step):
            return False
        measured = measured_adapter(self.run.cfg.output_dir, self.run.cfg.name, state.step)
        try:
            os.link(measured, path)
        except OSError:  # a file system without hard links, or the file is gone
            return False
        return True

    # --- the end -----------------------------------------------------------------------

    @property
    def adapter_path(self) -> Path:
        return self.run.cfg.output_dir / f"{self.run.cfg.name}.safetensors"

    def finish(self, stop: StopRequest) -> RunResult:
        """After the loop: the result of an interrupted run, or the last preview and export.

        A signal during the export lets it finish (the run then ends as interrupted, with its
        adapter written); one before it skips a final preview that is still due.
        """
        state = self.state
        if self.stopping and state.step < self.run.cfg.train.max_steps:
            self.report(f"interrupted at step {state.step}")
            result = self.result(None)
            result.interrupted = True
            result.checkpoint = self.checkpointer.folder / f"step-{state.step:06d}"
            return result
        previewed = state.step in [step for step, _ in state.previews]
        if self.previewer and not previewed and not stop.requested:
            self.preview()  # a resumed run that was already past its last preview
        stop.then = "stopping once the adapter is written"
        if self.measurer and not stop.requested:
            take_measures(self)  # a resumed run that was already past its last measurement
        ema_path = self.export()
        if self.main and state.measures:
            with self.side_task("writing the picked adapter"):
                keep_best(self)
        self.report("finished")
        result = self.result(ema_path)
        result.interrupted = stop.requested
        return result

    def export(self) -> Path | None:
        """Write the adapter (and its EMA, beside it or instead of it); return the EMA path."""
        adapter_path = self.adapter_path
        self.run.accelerator.wait_for_everyone()
        ema_path = None
        if self.ema and self.run.cfg.train.ema_export == "beside":
            ema_path = adapter_path.with_name(f"{adapter_path.stem}-ema.safetensors")
        with (
            self.events.phase("exporting"),
            full_adapter_weights(self.run.accelerator, self.run.unet),
        ):
            if self.main:
                self.write_adapters(adapter_path, ema_path)
        return ema_path

    def write_adapters(self, adapter_path: Path, ema_path: Path | None) -> None:
        inject_fault("term-in-export", self.state.step)
        metadata = self.file_metadata()
        self.write_adapter_file(adapter_path, metadata, with_ema=bool(self.ema) and not ema_path)
        if ema_path:
            self.write_adapter_file(ema_path, metadata, with_ema=True)
        self.say(f"saved {adapter_path}" + (f" and {ema_path}" if ema_path else ""))

    def file_metadata(self) -> dict[str, str]:
        epochs = self.state.epoch + (1 if self.state.position else 0)  # begun ones
        return self.metadata(self.state.step, epochs)

    def write_adapter_file(self, path: Path, metadata: dict[str, str], with_ema: bool) -> None:
        with self.ema.swapped_in() if with_ema else nullcontext():
            save_lora_file(path, self.run.family, self.run.adapted, metadata)

    def report(self, status: str) -> None:
        if not self.main:
            return
        with self.side_task("writing report.html"):
            self.events.write("status", step=self.state.step, status=status)
            self.write_report(status)

    def written_previews(self) -> list[tuple[int, str]]:
        """The previews on disk: a failed one stays in the state, which every process shares."""
        return [(s, p) for s, p in self.state.previews if (self.run.cfg.output_dir / p).is_file()]

    def write_report(self, status: str) -> None:
        state, cfg = self.state, self.run.cfg
        seconds = self.seconds_trained()
        per_step = (time.time() - self.began) / max(self.session_steps, 1)
        left = max(cfg.train.max_steps - state.step, 0) * per_step
        data = ReportData(
            name=cfg.name,
            status=status,
            step=state.step,
            max_steps=cfg.train.max_steps,
            losses=state.losses,
            lrs=state.lrs,
            validation=state.validation,
            previews=self.written_previews(),
            measures=state.measures,
            picked=state.picked,
            skipped=state.skipped,
            dataset=self.run.dataset_lines,
            config=cfg.model_dump(mode="json"),
            timings={
                "report written": time.strftime("%Y-%m-%d %H:%M:%S"),
                "training time": f"{seconds:.1f} s",
                "seconds per step (this session)": f"{per_step:.3f}",
                "estimated time left": f"{left:.0f} s",
            },
        )
        write_report(cfg.output_dir, data)

    def result(self, ema_path: Path | None) -> RunResult:
        state = self.state
        return RunResult(
            adapter_path=self.adapter_path,
            steps=state.step,
            losses=state.losses,
            previews=[self.run.cfg.output_dir / path for _, path in self.written_previews()],
            ema_path=ema_path,
            skipped=state.skipped,
            validation=state.validation,
        )

    def close(self) -> None:
        self.events.close()
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.run.accelerator.end_training()


def checkpoint_adapter_name(name: str, step: int) -> str:
    """The adapter file in a checkpoint's folder (`checkpoints/step-NNNNNN/`)."""
    return f"{name}-step-{step:06d}.safetensors"


def due(step: int, every: int, last: int | None = None) -> bool:
    return step == last or (every > 0 and step % every == 0)


def one_line(exc: BaseException) -> str:
    """`OSError: [Errno 28] No space left on device: ...`: what broke, in one line."""
    name, line = type(exc).__name__, first_line(exc)
    return line if line == name else f"{name}: {line}"
