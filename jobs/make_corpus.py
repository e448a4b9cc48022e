"""Generate a synthetic illustration corpus (for the demo and tests; no data set needed).

    python jobs/make_corpus.py --out outputs/corpus --count 48 [--with-bad-files]

Images are outlined flat-colored shapes with hatching over white, gradient or striped backdrops, at
several aspect ratios, saved as PNG and JPEG with mixed-case extensions in nested folders: what a real
scraped corpus looks like to the preprocess job. ``--with-bad-files`` adds one of each kind of damage the
job must survive (empty, truncated, not an image, corrupt bytes, too small), and a non-image file.
The work is :func:`pipelines.data.synthetic.write_corpus`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from pipelines.data.synthetic import write_corpus  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--out", default="outputs/corpus", help="corpus folder")
    p.add_argument("--count", type=int, default=48, help="images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-bad-files", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(write_corpus(Path(args.out), args.count, args.with_bad_files, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
