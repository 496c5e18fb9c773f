"""A tiny WD-tagger-layout model whose output is known: `model.onnx` and `selected_tags.csv`.

The graph takes the taggers' input (a batch of square BGR images in 0..255, NHWC) and gives
`sigmoid(mean_bgr / 255 @ WEIGHTS + BIASES)`, so each tag's probability follows from the image's
mean colour: `expected_probabilities` computes it the same way for the tests.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SIZE = 32
# (name, category, weights on the mean blue, green and red, bias)
TAGS = [
    ("general", 9, (0, 0, 0), 4.0),  # ratings: always likely, always dropped
    ("sensitive", 9, (0, 0, 0), 3.0),
    ("1girl", 0, (0, 0, 0), 1.0),  # 0.73 on any image
    ("red_background", 0, (-4, -4, 8), -2.0),  # likely on red only
    ("blue_theme", 0, (8, -4, -4), -2.0),  # likely on blue only
    ("^_^", 0, (0, 0, 0), 0.0),  # 0.5: a kaomoji keeps its underscore
    ("simple_background", 0, (0, 0, 0), 2.0),  # 0.88
    ("hatsune_miku", 4, (0, 0, 0), 1.5),  # 0.82: under the character threshold 0.85
    ("kirisame_marisa", 4, (0, 0, 0), 3.0),  # 0.95
    ("low_confidence_tag", 0, (0, 0, 0), -3.0),  # 0.05
]


def weights() -> tuple[np.ndarray, np.ndarray]:
    w = np.array([tag[2] for tag in TAGS], np.float32).T  # (3, tags)
    b = np.array([tag[3] for tag in TAGS], np.float32)
    return w, b


def expected_probabilities(rgb: tuple[int, int, int]) -> dict[str, float]:
    """Each tag's probability for a solid image of colour `rgb`, as the model computes it."""
    w, b = weights()
    bgr = np.array(rgb[::-1], np.float32) / 255.0
    logits = bgr @ w + b
    return {tag[0]: float(1 / (1 + np.exp(-x))) for tag, x in zip(TAGS, logits, strict=True)}


def write_tiny_tagger(folder: Path, batch: int | None = None) -> Path:
    """Write the model (`batch`: a fixed batch size, None for a dynamic one) and its tag list."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w, b = weights()
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Div", ["mean", "scale"], ["unit"]),
            helper.make_node("MatMul", ["unit", "w"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch or "N", len(TAGS)])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(TAGS):
            writer.writerow([i, name, category, 1000 - i])
    return folder


def cache_tiny_tagger(hub: Path, repo_id: str = "tiny/wd-tagger") -> Path:
    """The tagger as a download leaves it in a Hugging Face cache folder (`HF_HUB_CACHE`)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    write_tiny_tagger(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir(exist_ok=True)
    return hub
