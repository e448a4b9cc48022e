"""Train the latent autoencoder (the VAE) with Ray Train + DeepSpeed ZeRO-2, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/train_vae.py --model /mnt/models/base \\
        --data s3://bucket/datasets/studio-v1 --out /mnt/models/base-studio-vae --decoder-only \\
        --workers 8 --gpu --batch-size 4 --crop-size 512 --lr 1e-5 --train-steps 20000 --run-name studio-vae
    python jobs/train_vae.py --model outputs/base --images outputs/corpus --out outputs/base-vae \\
        --train-steps 200 --batch-size 16 --lr 1e-3                     # tiny, from scratch, local Ray, CPU

At ``sdxl`` this fine-tunes the SDXL VAE (assemble ``--model`` with ``jobs/init_model.py --vae ...``) on a
studio's own art; ``--decoder-only`` keeps the encoder, hence the latent space and every U-Net trained on
it, as Stability's ft-MSE VAE did. At ``tiny`` it trains the small VAE from scratch. Pictures come from a
preprocessed dataset's ``image`` column (``--data``) or from a corpus of images as the preprocess job reads
it (``--images``: a folder tree or Parquet files of image bytes). The output is ``--model`` with ``vae/``
replaced. Rerunning with the same --run-name and --storage resumes from the last checkpoint.
The work is pipelines/training/vae.py.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

from jobs import flags  # noqa: E402
from pipelines.training.tracking import tracking_uri  # noqa: E402
from pipelines.training.vae import RECONSTRUCTIONS, VAETrainConfig, make_vae_trainer  # noqa: E402


def build_parser():
    p = flags.parser_for(__doc__)
    p.add_argument("--model", required=True, help="model folder whose vae/ to start from")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="preprocess output folder (its image column)")
    source.add_argument("--images", help="a corpus: folder tree of images or Parquet files of image bytes")
    p.add_argument("--out", required=True, help="model folder written at the end (--model with vae/ replaced)")
    flags.add_training(p)
    flags.add_workers(p)
    p.add_argument("--crop-size", type=int, default=None, help="square training crop (default: the preset's "
                                                                "smallest bucket side)")
    p.add_argument("--final-lr-fraction", type=float, default=1.0,
                   help="cosine decay of the lr to lr * this at the last step (default 1: constant)")
    p.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default="mse")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-only", action="store_true", help="train the decoder only (the latent space stays)")
    p.add_argument("--heldout", type=int, default=16, help="pictures per worker held out for the PSNR")
    p.add_argument("--eval-every", type=int, default=200, help="held-out PSNR to MLflow every this many steps")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10, help="progress line every this many steps")
    p.add_argument("--metrics-every", type=int, default=10, help="send the per-step metrics to MLflow every this "
                                                                 "many steps")
    p.add_argument("--run-name", default="colorize-xl")
    flags.add_mlflow(p)
    flags.add_ray(p)
    return p


def config_from(args) -> VAETrainConfig:
    return VAETrainConfig(
        model=args.model, export=args.out, dataset=args.data, images=args.images, steps=args.train_steps,
        batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr,
        final_lr_fraction=args.final_lr_fraction, reconstruction=args.reconstruction,
        kl_weight=args.kl_weight, decoder_only=args.decoder_only, heldout=args.heldout, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, metrics_every=args.metrics_every,
        seed=args.seed, mlflow_tracking_uri=tracking_uri(args.mlflow_uri), mlflow_experiment=args.experiment,
        run_name=args.run_name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with flags.job_errors("train_vae"):
        cfg = config_from(args)
    return flags.fit_and_print("train_vae", functools.partial(make_vae_trainer, cfg), args)


if __name__ == "__main__":
    raise SystemExit(main())
