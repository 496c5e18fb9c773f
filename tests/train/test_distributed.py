"""Two processes (gloo, on the CPU) train what one process trains with the same global batch.

Run from the repository root, as a user of a checkout would: there the top-level `datasets/`
folder is importable as a namespace package and must not derail accelerate.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_CONFIG, ROOT, TEST_RUN, demo_config
from safetensors.torch import load_file

from stylelora.data.dataset import BucketBatchSampler, DataOptions, ImageCaptionDataset
from stylelora.data.scan import scan_folder
from stylelora.train.trainer import train

# Summed in another order (the all-reduce), a gradient differs in its last bits. Adam divides
# each gradient by its own running size, so in the odd element near zero such a difference
# grows to a few percent of one step (lr = 1e-2); on average it stays far below that.
LEARNING_RATE = 1e-2
MAX_DIFFERENCE = 0.1 * LEARNING_RATE
MEAN_RELATIVE_DIFFERENCE = 1e-3
STEPS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port())]
    args += ["-m", "stylelora", "train", str(DEMO_CONFIG), "--output-dir", str(out)]
    args += [arg for item in (*TEST_RUN, *overrides) for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_two_processes_match_one_process_with_the_same_global_batch(
    tiny_sd15_dir, demo_subset, tmp_path
):
    data = demo_subset(4)
    common = [
        f"model={str(tiny_sd15_dir)!r}",
        f"data.dir={str(data)!r}",
        f"train.max_steps={STEPS}",
        "adapter.text_encoder=true",
        "data.flip=true",
        "sample.num_inference_steps=2",
        f"train.learning_rate={LEARNING_RATE}",
        "train.lr_warmup_steps=0",
    ]
    cfg = demo_config(tmp_path / "one", *common, "train.batch_size=2")
    single = load_file(train(cfg).adapter_path)

    out = tmp_path / "two"
    done = torchrun(out, *common, "train.batch_size=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 (2 process(es) x batch 1 x accumulation 1)" in done.stdout
    assert done.stdout.count("saved ") == 1  # one process writes and logs
    assert len(list((out / "samples").glob("*.png"))) == 1

    double = load_file(out / f"{cfg.name}.safetensors")
    assert double.keys() == single.keys()
    assert any(k.startswith("lora_te_") for k in double)
    worst = max((double[k] - single[k]).abs().max().item() for k in single)
    relative = max(
        ((double[k] - single[k]).abs().mean() / single[k].abs().mean()).item()
        for k in single
        if single[k].abs().mean() > 0
    )
    print(f"2 x batch 1 vs 1 x batch 2: largest difference {worst:.2e}, mean {relative:.2e}")
    assert worst < MAX_DIFFERENCE and relative < MEAN_RELATIVE_DIFFERENCE
    moved = min(single[k].abs().max().item() for k in single if "lora_up" in k)
    assert moved > LEARNING_RATE  # every adapter trained: the match is not of untouched zeros


def test_process_slices_make_up_the_single_process_batches(demo_subset):
    records = scan_folder(demo_subset(5)).records
    dataset = ImageCaptionDataset(records, DataOptions(resolution=64))
    single = list(BucketBatchSampler(dataset, 2, seed=3))
    ranks = [list(BucketBatchSampler(dataset, 1, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(single) == 3 and sorted(len(batch) for batch in single) == [1, 2, 2]
    for whole, first, second in zip(single, *ranks, strict=True):
        if len(whole) == 2:
            assert first + second == whole
        else:  # the bucket's short last batch: its one sample goes to both processes
            assert first == second == whole
