"""Import a published ColorizeDiffusionXL checkpoint into a colorize-xl model folder.

    python jobs/import_checkpoint.py --cdxl ColorizeDiffusionXL/sdxl.safetensors \\
        --clip CLIP-ViT-bigG-14-laion2B-39B-b160k/ \\
        --tagger-weights wd-v1-4-swinv2-tagger-v2/model.safetensors \\
        --tagger-tags wd-v1-4-swinv2-tagger-v2/selected_tags.csv --out models/cdxl
    python jobs/import_checkpoint.py --cdxl xlv2.safetensors ...                   # backbone + plug-in
    python jobs/import_checkpoint.py --cdxl xlv2.safetensors --backbone-only ...   # plug-in dropped, counted

The files come from the model hubs tellurion/ColorizeDiffusionXL (CC BY-NC-SA 4.0: the imported folder
is under the same terms), laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (OpenCLIP or transformers files, a
file or the downloaded folder) and SmilingWolf/wd-v1-4-swinv2-tagger-v2. The parameterization is
v-prediction unless the checkpoint's file name contains "eps" (the authors' rule); --prediction overrides
it. An xlv2* file also gives the model folder its plug-in (plugin/: the ReferenceNet and the background
LoRA, rank read from the file); its unused tensors (conv_fg, the ReferenceNet's layers after its last bank
block) are dropped and counted. Prints what was loaded, converted and dropped, then one JSON line. The work is
:func:`model.cdxl_checkpoint.import_checkpoint`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from model.cdxl_checkpoint import DTYPES, PREDICTIONS, import_checkpoint  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--cdxl", required=True, help="the published sdxl*.safetensors or xlv2*.safetensors")
    p.add_argument("--clip", required=True, help="CLIP ViT-bigG-14: OpenCLIP or transformers file, or its folder")
    p.add_argument("--tagger-weights", required=True, help="WD SwinV2 tagger v2 model.safetensors (timm keys)")
    p.add_argument("--tagger-tags", required=True, help="its selected_tags.csv")
    p.add_argument("--out", required=True, help="model folder to write (must be new or empty)")
    p.add_argument("--prediction", choices=sorted(PREDICTIONS), default=None,
                   help="parameterization (default: eps if the checkpoint's file name contains 'eps', else v)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="precision of the written weights")
    p.add_argument("--backbone-only", action="store_true",
                   help="for an xlv2* file: import the backbone only and drop the plug-in")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("import_checkpoint"):
        report = import_checkpoint(args.cdxl, args.clip, args.tagger_weights, args.tagger_tags, args.out,
                                   prediction=args.prediction, dtype=DTYPES[args.dtype],
                                   backbone_only=args.backbone_only)
    for line in report.lines():
        print(line)
    print(json.dumps({"model": str(report.out), "checkpoint": report.kind, "prediction_type": report.prediction_type,
                      "dtype": report.dtype, "dropped": sum(report.dropped.values()),
                      "plugin": "plugin.reference_net" in report.loaded}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
