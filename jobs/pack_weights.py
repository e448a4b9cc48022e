"""Pack a trained model folder into a preset's shipped starting weights, which ``jobs/init_model.py``
starts from unless --random-init.

    python jobs/pack_weights.py --model outputs/tiny-stage1 --out model/assets/tiny \
        --vae outputs/tiny-vae-decoder                    # optional: a decoder-only fine-tune of its VAE

Writes ``vae.safetensors`` and ``colorizer.safetensors`` (fp16) into --out; the folder's README says
how its files were made. --vae ships another folder's VAE, which must have the same encoder (a
``jobs/train_vae.py --decoder-only`` run), since the colorizer learned that encoder's latents. A folder with a stage-2 plug-in is refused: the shipped weights are a starting
point for stage 1 and 2 alike. The work is :func:`model.shipped.save_shipped`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from model.colorizer import Colorizer  # noqa: E402
from model.config import preset_name  # noqa: E402
from model.shipped import check_same_encoder, save_shipped  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--model", required=True, help="model folder to pack (e.g. a stage-1 export)")
    p.add_argument("--out", required=True, help="folder for vae.safetensors and colorizer.safetensors")
    p.add_argument("--vae", default=None, help="model folder whose VAE to ship instead (same encoder)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("pack_weights"):
        model = Colorizer.from_pretrained(args.model)
        if model.plugin is not None:
            raise ValueError(f"{args.model} has a stage-2 plug-in; pack a folder without plugin/ (a stage-1 export)")
        if args.vae:
            vae = Colorizer.from_pretrained(args.vae, components=("vae",)).vae
            check_same_encoder(model.vae, vae, args.vae)
            model.vae = vae
        weights = save_shipped(model, args.out)
    print(json.dumps({"preset": preset_name(model.config), "vae": str(weights.vae), "colorizer": str(weights.colorizer),
                      "megabytes": round((weights.vae.stat().st_size + weights.colorizer.stat().st_size) / 2**20, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
