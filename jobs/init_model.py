"""Assemble a colorize-xl model folder from a preset and (optionally) published weights.

    python jobs/init_model.py --preset sdxl --out models/base \\
        --unet animagine-xl-4.0.safetensors --vae sdxl-vae/ \\
        --tagger-weights wd-swinv2-tagger/model.safetensors --tagger-tags wd-swinv2-tagger/selected_tags.csv \\
        --clip open_clip_pytorch_model.bin
    python jobs/init_model.py --preset tiny --out outputs/base              # the shipped tiny weights (demo)
    python jobs/init_model.py --preset tiny --out outputs/base --random-init --seed 0    # random init

The folder is the starting point of training and holds the frozen encoders that preprocessing uses, so
both read the same weights. A preset that ships starting weights (``model/assets/<preset>/``: the tiny
VAE and pretrained colorizer) starts from them unless --random-init; published files given here take
precedence over shipped ones. An existing folder is left as it is. The work is
:func:`model.assembly.init_model`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from model.assembly import init_model  # noqa: E402
from model.colorizer import PretrainedPaths  # noqa: E402
from model.config import PRESETS  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0, help="initialization seed of the parts not loaded")
    p.add_argument("--random-init", action="store_true",
                   help="ignore the preset's shipped starting weights (model/assets/<preset>/)")
    for name in ("unet", "vae", "tagger-weights", "tagger-tags", "clip"):
        p.add_argument(f"--{name}", default=None, help=f"local file or folder of the published {name.replace('-', ' ')}")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    paths = PretrainedPaths(unet=args.unet, vae=args.vae, tagger_weights=args.tagger_weights,
                            tagger_tags=args.tagger_tags, clip=args.clip)
    with flags.job_errors("init_model"):
        folder = init_model(Path(args.out), args.preset, args.seed, paths, random_init=args.random_init)
    print(json.dumps({"model": str(folder), "preset": args.preset, "random_init": args.random_init}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
