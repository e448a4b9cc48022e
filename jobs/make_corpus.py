"""Generate a synthetic illustration corpus (for the demo and tests; no data set needed).

    python jobs/make_corpus.py --out outputs/corpus --count 48 [--with-bad-files]

Images are outlined flat-colored shapes with hatching over white, gradient or striped backdrops, at
several aspect ratios, saved as PNG and JPEG with mixed-case extensions in nested folders: what a real
scraped corpus looks like to the preprocess job. ``--with-bad-files`` adds one of each kind of damage the
job must survive (empty, truncated, not an image, corrupt bytes, too small), and a non-image file.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pipelines.data.synthetic import synthetic_illustration  # noqa: E402

SIZES = ((256, 256), (320, 192), (192, 320), (288, 224), (240, 300))


def make_corpus(out: Path, count: int, with_bad_files: bool = False, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        picture = synthetic_illustration(seed=seed * 100_003 + i, width=width, height=height)
        folder = out / f"set{i % 3}"
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(picture.color)
        if i % 4 == 3:
            path = folder / f"img_{i:05d}.JPG"
            image.save(path, format="JPEG", quality=92)
        else:
            path = folder / f"img_{i:05d}.png"
            image.save(path, format="PNG")
        written += 1
    bad = 0
    if with_bad_files:
        broken = out / "broken"
        broken.mkdir(exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(synthetic_illustration(seed=999, width=128, height=128).color).save(png, format="PNG")
        samples = {
            "empty.png": b"",
            "truncated.png": png.getvalue()[: len(png.getvalue()) // 3],
            "not_an_image.jpg": b"<html><body>404 not found</body></html>",
            "random_bytes.webp": bytes(range(256)) * 4,
            "tiny.png": _tiny_png(),
        }
        for name, data in samples.items():
            (broken / name).write_bytes(data)
        (broken / "README.txt").write_text("not an input: no image extension\n")
        bad = len(samples)
    return {"corpus": str(out), "images": written, "bad_files": bad}


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/corpus")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-bad-files", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(make_corpus(Path(args.out), args.count, args.with_bad_files, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
