"""Derive the CLIP BPE tokenizer files (`vocab.json`, `merges.txt`) from OpenAI's BPE table.

The Hugging Face CLIP tokenizers of SD1.x, SD2.x and SDXL (openai/clip-vit-large-patch14 and the
OpenCLIP ViT-H / ViT-bigG ones) all share one vocabulary: the one OpenAI's `SimpleTokenizer`
builds from `bpe_simple_vocab_16e6.txt.gz`. That file ships inside the `open_clip_torch` and
`clip` wheels, so the tokenizer can be rebuilt without the Hugging Face hub:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python -m stylelora.families.build_clip_tokenizer /tmp/oc/bpe_simple_vocab_16e6.txt.gz

The script writes `vocab.json.gz` and `merges.txt.gz` into `clip_tokenizer/` next to it (pass
`--out DIR` for elsewhere, `--no-gzip` for plain files). It uses only the standard library.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# OpenAI CLIP's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the table.
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
VOCAB_SIZE = 2 * 256 + NUM_MERGES + len(SPECIAL_TOKENS)  # 49408
MERGES_HEADER = "#version: 0.2"
OUT_DIR = Path(__file__).resolve().parent / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..NUM_MERGES of the table (line 0 is a version header)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: not a CLIP BPE table (expected {NUM_MERGES} merge pairs)")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in SimpleTokenizer's order: bytes, bytes + '</w>', merges, specials."""
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def render(bpe_path: Path) -> tuple[str, str]:
    """(vocab.json text, merges.txt text) in the layout of the Hugging Face CLIP repos."""
    merges = read_merges(bpe_path)
    vocab_text = json.dumps(build_vocab(merges), ensure_ascii=False, separators=(",", ":"))
    merges_text = "\n".join([MERGES_HEADER, *(" ".join(pair) for pair in merges)]) + "\n"
    return vocab_text, merges_text


def write(bpe_path: Path, out_dir: Path = OUT_DIR, compress: bool = True) -> list[Path]:
    vocab_text, merges_text = render(bpe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("vocab.json", vocab_text), ("merges.txt", merges_text)):
        data = text.encode("utf-8")
        if compress:
            path = out_dir / f"{name}.gz"
            # mtime=0 and no file name in the header: the same input gives the same bytes.
            with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
                gz.write(data)
        else:
            path = out_dir / name
            path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--no-gzip", action="store_true", help="write plain vocab.json/merges.txt")
    args = parser.parse_args(argv)
    for path in write(args.bpe, args.out, compress=not args.no_gzip):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
