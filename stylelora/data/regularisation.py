"""Regularisation (class) images, as kohya draws them.

`data.reg_dir` is laid out like a kohya `reg_data_dir`: `N_class` folders, each image captioned
by its caption file or else by the folder's class name (never with the trigger word). Each
epoch draws them as often as the training images: every regularisation image once with its
folder's repeats, then one more draw each in turn until the counts match (kohya's
DreamBoothDataset). The loss of their draws is weighted by `train.prior_loss_weight`.
"""

from __future__ import annotations

from stylelora.config import DataConfig
from stylelora.data.scan import ScanResult, check_hint, collect_images, require_usable


def scan_regularisation(data: DataConfig) -> ScanResult | None:
    """The regularisation images, or None without `data.reg_dir`; one line when none is usable."""
    if data.reg_dir is None:
        return None
    scan = collect_images(
        data.reg_dir,
        data.caption_extension,
        repeats=1,
        min_image_size=data.min_image_size,
        strict=data.strict,
        key="data.reg_dir",
    )
    require_usable(scan, data.reg_dir, data.strict, check_hint(data.reg_dir), key="data.reg_dir")
    return scan


def regularisation_draws(repeats: list[int], training_draws: int) -> list[int]:
    """How often each regularisation image is drawn an epoch: kohya's fill, which registers the
    images in order with their folder's repeats until the training draws are reached (images
    after that point are not drawn), then adds one draw to each in turn up to that count."""
    draws = [0] * len(repeats)
    total = 0
    for index, count in enumerate(repeats):
        if total >= training_draws:
            return draws
        draws[index] = count
        total += count
    # every image registered and draws still short: the rounds of one more each, the last
    # round stopping part-way
    rounds, first = divmod(max(0, training_draws - total), len(draws) or 1)
    return [count + rounds + (index < first) for index, count in enumerate(draws)]
