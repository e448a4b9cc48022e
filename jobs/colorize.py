"""Colorize one sketch after one reference, from the command line: the HTTP API's options, one PNG out.

    python jobs/colorize.py --model models/cdxl --sketch page.png --reference sheet.png --out page-color.png
    python jobs/colorize.py --model models/cdxl --sketch frame.jpg --extract-lines --line-extractor xdog \\
        --reference sheet.png --size 1024x1536 --steps 20 --seed 7 --device cuda --dtype bfloat16 --out out.png
    python jobs/colorize.py --model models/cdxl-sdxl --sketch page.png --reference sheet.png \\
        --background scenery.png --background-enhance --merge-scale 0.3 --out out.png

The options are those of ``POST /v1/colorize`` (``serve/api.py``) with dashes for underscores; any left out
is the model's default (``model.options.ColorizeOptions``), and ``--size`` left out fits the sketch's aspect
at the preset's default area, as the API does. ``--seed`` left out is drawn at random and reported.
Images are decoded with ``model.image_io`` (the API's safe decoder; any format Pillow reads, first frame,
transparency on white). ``--extract-lines`` takes the sketch for a colored or photographed drawing and
extracts its lines first with a weight-free extractor of ``model.line_art``, as the API does.

Progress goes to stderr, one line per denoising step (a bar when stderr is a terminal; ``--progress``).
The PNG carries the parameters used in its text chunks (``parameters``: JSON, and one chunk per
parameter); stdout gets one JSON line: the parameters, the files, the device and the seconds spent.
Bad input (a missing file, an undecodable image, an invalid option value, a size off the model's grid)
exits with status 2 and one line ``colorize: <reason>`` on stderr. No network: weights from local paths.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout, no install

import numpy as np  # noqa: E402

from jobs import flags  # noqa: E402
from model.image_io import DecodeError, decode_image  # noqa: E402
from model.line_art import CLASSIC_EXTRACTORS, extract_drawing  # noqa: E402
from model.options import SAMPLERS, ColorizeOptions  # noqa: E402

JOB = "colorize"
USAGE_ERROR = 2  # bad input: argparse's own status for usage errors
MAX_SEED = 2**63 - 1  # as the HTTP API
MAX_SKETCH_ASPECT = 8.0  # the sketch's long side over its short side, as the HTTP API
DTYPES = ("float32", "bfloat16", "float16")
# The reference maskers serve/app.py accepts (model.segmenter.MASKERS less the sketch masker); named here so
# the flags are checked without importing the segmenter (torchvision).
REFERENCE_MASKERS = ("rmbg-2.0", "birefnet", "birefnet-hr", "isnet")
SKETCH_MASKER = "isnet-sketch"
PROGRESS_MODES = ("auto", "bar", "lines", "none")


class InputError(ValueError):
    """Input the command cannot use; ``str(err)`` is the one line it prints."""


# ---------------------------------------------------------------------------------------------- flags
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``colorize: <reason>`` (status 2), not usage + message."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{JOB}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = p.add_argument_group("files")
    io_.add_argument("--model", required=True, help="model folder (config.json + components; plugin/ if any)")
    io_.add_argument("--sketch", required=True, help="the drawing: dark lines on light (or see --extract-lines)")
    io_.add_argument("--reference", required=True, help="the reference picture (colors, character)")
    io_.add_argument("--background", default=None,
                     help="a picture for the background (needs the plug-in or --background-enhance); default: "
                          "the reference with its foreground whitened")
    io_.add_argument("--out", required=True, help="the PNG to write (its folder is made)")

    s = p.add_argument_group("sampling (default: the model's)")
    s.add_argument("--size", default=None, metavar="WxH",
                   help="output width x height on the model's size grid, or N for N x N (default: the sketch's "
                        "aspect at the preset's default area)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps")
    s.add_argument("--seed", type=int, default=None, help=f"noise seed, 0..{MAX_SEED} (default: random, reported)")
    s.add_argument("--reference-guidance", type=float, default=None, help="reference CFG scale, 0..30")
    s.add_argument("--sketch-guidance", type=float, default=None, help="sketch CFG scale, 0..30")
    s.add_argument("--reference-strength", type=float, default=1.0, help="cross-attention strength (0 = none)")
    s.add_argument("--sketch-strengths", default=None, metavar="A,B,C,D",
                   help="one sketch-injection scale per injection point (default: 1 everywhere)")
    s.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's")

    lines = p.add_argument_group("line extraction")
    lines.add_argument("--extract-lines", action="store_true",
                       help="the sketch is a colored or photographed drawing: extract its lines first")
    lines.add_argument("--line-extractor", choices=tuple(CLASSIC_EXTRACTORS), default="xdog",
                       help="weight-free extractor for --extract-lines (default: xdog)")

    bg = p.add_argument_group("foreground and background")
    bg.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=None,
                    help="the stage-2 plug-in on or off (default: on when the model folder has one)")
    bg.add_argument("--background-enhance", action="store_true",
                    help="split attention over the reference and the background picture without the plug-in")
    bg.add_argument("--foreground-strength", type=float, default=1.0, help="0..10")
    bg.add_argument("--background-strength", type=float, default=1.0, help="0..10")
    bg.add_argument("--merge-scale", type=float, default=0.0, help="0..1")
    bg.add_argument("--sketch-mask-threshold", type=float, default=0.05, help="0..0.99")
    bg.add_argument("--reference-mask-threshold", type=float, default=0.5, help="0..1")
    bg.add_argument("--reference-masker", choices=REFERENCE_MASKERS, default="rmbg-2.0",
                    help="what --reference-masker-weights are (default: rmbg-2.0)")
    bg.add_argument("--reference-masker-weights", default=None,
                    help="learned reference mask model, a local file (default: the weight-free mask)")
    bg.add_argument("--sketch-masker-weights", default=None,
                    help="ISNet-sketch (sketch-segment.safetensors), a local file (default: the weight-free mask)")

    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the model")
    run.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                     help="per-step progress on stderr: auto (a bar on a terminal, else lines), bar, lines, none")
    flags.add_acceleration(p)
    return p


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``WxH`` (or ``N``) → (width, height); the grid is checked against the model later."""
    try:
        return flags.parse_size(text)
    except argparse.ArgumentTypeError as err:
        raise InputError(f"--size: {err}") from None


def parse_strengths(text: str | None) -> tuple[float, ...] | None:
    """``"1,0.5,1,1"`` → (1.0, 0.5, 1.0, 1.0)."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--sketch-strengths must be numbers separated by commas, got {text!r}") from None
    return values


def options_from_args(args: argparse.Namespace) -> ColorizeOptions:
    """The :class:`ColorizeOptions` the flags ask for (``None`` fields: the model's defaults). Its own
    validation messages are the errors."""
    try:
        return ColorizeOptions(
            size=parse_size(args.size), steps=args.steps, reference_guidance=args.reference_guidance,
            sketch_guidance=args.sketch_guidance, reference_strength=args.reference_strength,
            sketch_strengths=parse_strengths(args.sketch_strengths), plugin=args.plugin,
            background_enhance=args.background_enhance, foreground_strength=args.foreground_strength,
            background_strength=args.background_strength, merge_scale=args.merge_scale,
            sketch_mask_threshold=args.sketch_mask_threshold,
            reference_mask_threshold=args.reference_mask_threshold, sampler=args.sampler)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(_flag_names(str(err))) from None


def _flag_names(message: str) -> str:
    """``reference_guidance 31.0 is outside ...`` → ``--reference-guidance 31.0 is outside ...``."""
    head, sep, rest = message.partition(" ")
    name = head.split("[")[0]
    if name in {f.replace("-", "_") for f in _OPTION_FLAGS}:
        return "--" + head.replace("_", "-") + sep + rest
    return message


_OPTION_FLAGS = ("steps", "reference-guidance", "sketch-guidance", "reference-strength", "sketch-strengths",
                 "foreground-strength", "background-strength", "merge-scale", "sketch-mask-threshold",
                 "reference-mask-threshold", "sampler", "size")


def check_seed(seed: int | None) -> int:
    """The seed to use: the one given (checked), else a random one (reported, so the picture can be remade)."""
    if seed is None:
        return secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {seed} is outside [0, {MAX_SEED}]")
    return seed


# --------------------------------------------------------------------------------------------- inputs
def read_image(path: str | Path, flag: str, *, max_aspect: float | None = None) -> np.ndarray:
    """A local image file → (H, W, 3) uint8 RGB through the API's safe decoder; :class:`InputError` naming
    the flag and the file when it is missing or cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file" if not path.exists() else f"{flag} {path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    try:
        return decode_image(data, max_aspect=max_aspect)
    except DecodeError as err:
        raise InputError(f"{flag} {path}: {err}") from None


@dataclass
class Inputs:
    """The decoded pictures of one pair (RGB uint8) and how the sketch was prepared."""

    sketch: np.ndarray
    reference: np.ndarray
    background: np.ndarray | None = None
    line_extractor: str | None = None  # the sketch's lines were extracted with this (None: used as given)


def read_inputs(sketch: str | Path, reference: str | Path, background: str | Path | None = None,
                line_extractor: str | None = None) -> Inputs:
    """Decode the pair (and the background picture); extract the sketch's lines when ``line_extractor`` is set."""
    drawing = read_image(sketch, "--sketch", max_aspect=MAX_SKETCH_ASPECT)
    if line_extractor is not None:
        try:
            drawing = extract_drawing(drawing, line_extractor)
        except ValueError as err:
            raise InputError(f"--line-extractor: {err}") from None
    return Inputs(sketch=drawing, reference=read_image(reference, "--reference"),
                  background=None if background is None else read_image(background, "--background"),
                  line_extractor=line_extractor)


# ---------------------------------------------------------------------------------------------- model
def check_out(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--out {path}: the output is a PNG; name it *.png")
    if path.is_dir():
        raise InputError(f"--out {path}: is a folder")
    try:  # made now, so an output that cannot be written fails before the generation, not after
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {path}: cannot make its folder ({err.strerror or err})") from None
    return path


def pick_device(name: str) -> str:
    """``auto`` → ``cuda`` when there is one, else ``cpu``; ``cuda`` without CUDA is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def check_masker_weights(reference_weights: str | None, sketch_weights: str | None) -> None:
    for flag, path in (("--reference-masker-weights", reference_weights), ("--sketch-masker-weights", sketch_weights)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")


def resolve_for_folder(folder: str | Path, options: ColorizeOptions, sketch_size: tuple[int, int],
                       has_background: bool) -> ColorizeOptions:
    """``options`` with the model folder's defaults filled in and the output size fixed (the sketch's aspect
    when none is given), checked against the folder's config before any weight is read: the size grid,
    ``--plugin`` on a model without one, the number of sketch strengths, a background picture that nothing
    reads. Raises :class:`InputError`."""
    from model.colorizer import read_config

    folder = Path(folder)
    try:
        config = read_config(folder)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"--model: {err}") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"--model {folder}: unreadable config.json ({err})") from None
    plugin_config = _plugin_config(folder)
    try:
        resolved = options.resolved(config, plugin_config)
    except ValueError as err:
        raise InputError(_flag_names(str(err))) from None
    s = config.sampling
    limits = dict(multiple=config.size_multiple, min_side=s.min_side, max_side=s.max_side)
    from model.sizes import fit_size

    size = resolved.size if resolved.size is not None else fit_size(*sketch_size, area=s.default_area, **limits)
    from model.unet import injection_points

    points = len(injection_points(config.unet))
    if resolved.sketch_strengths is not None and len(resolved.sketch_strengths) != points:
        raise InputError(f"--sketch-strengths needs {points} values (one per injection point), "
                         f"got {len(resolved.sketch_strengths)}")
    if has_background and not resolved.splits_attention:
        raise InputError("--background needs the plug-in on or --background-enhance"
                         + ("" if plugin_config is not None else " (this model has no plug-in)"))
    return replace(resolved, size=size)


def _plugin_config(folder: Path):
    if not (folder / "plugin").is_dir():
        return None
    from model.plugin import PluginConfig

    try:
        return PluginConfig.from_dict(json.loads((folder / "plugin" / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--model {folder}: unreadable plugin/config.json ({err})") from None


def load_model(folder: str | Path, device: str = "cpu", dtype: str = "float32",
               reference_masker: tuple[str, str] | None = None, sketch_masker_weights: str | None = None):
    """The :class:`~model.colorizer.Colorizer` of ``folder`` on ``device`` at ``dtype``, with the learned
    mask models when their weights are given (float32, as the Serve app loads them)."""
    from model.background import MaskModels
    from model.colorizer import Colorizer

    try:
        model = Colorizer.from_pretrained(folder, device=device, dtype=torch_dtype(dtype))
    except (ValueError, OSError) as err:
        raise InputError(f"--model {folder}: cannot load it: {_one_line(err)}") from None
    if reference_masker is not None or sketch_masker_weights is not None:
        sketch = None if sketch_masker_weights is None else (SKETCH_MASKER, sketch_masker_weights)
        try:
            model.masks = MaskModels.from_files(reference_masker, sketch, device=device)
        except (ValueError, OSError) as err:
            raise InputError(f"mask model weights: cannot load them: {_one_line(err)}") from None
    return model


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------ progress
def step_reporter(mode: str = "lines", stream=None) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(``on_step(done, total)``, ``close()``): progress on ``stream`` (stderr): a tqdm bar, or one line
    per step ``colorize: step 3/20 (1.2 s)``, or nothing."""
    stream = stream if stream is not None else sys.stderr
    if mode == "auto":
        mode = "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    if mode == "none":
        return (lambda done, total: None), (lambda: None)
    if mode == "bar":
        from tqdm import tqdm

        bar = None

        def on_bar(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=JOB, unit="step", file=stream)
            bar.update(done - bar.n)

        return on_bar, (lambda: bar is not None and bar.close())
    start = time.perf_counter()

    def on_line(done: int, total: int) -> None:
        print(f"{JOB}: step {done}/{total} ({time.perf_counter() - start:.1f} s)", file=stream, flush=True)

    return on_line, (lambda: None)


# --------------------------------------------------------------------------------------------- output
def parameters(options: ColorizeOptions, seed: int, inputs: Inputs) -> dict[str, Any]:
    """What was used, with the HTTP API's names (its ``parameters``), plus the sketch strengths."""
    width, height = options.size
    return {"seed": seed, "steps": options.steps, "width": width, "height": height,
            "reference_guidance": options.reference_guidance, "sketch_guidance": options.sketch_guidance,
            "reference_strength": options.reference_strength,
            "sketch_strengths": None if options.sketch_strengths is None else list(options.sketch_strengths),
            "plugin": options.plugin, "background_enhance": options.background_enhance,
            "foreground_strength": options.foreground_strength, "background_strength": options.background_strength,
            "merge_scale": options.merge_scale, "sketch_mask_threshold": options.sketch_mask_threshold,
            "reference_mask_threshold": options.reference_mask_threshold,
            "line_extractor": inputs.line_extractor, "background_reference": inputs.background is not None,
            "sampler": options.sampler}


def write_png(path: str | Path, image, info: dict[str, Any]) -> Path:
    """Write ``image`` as a PNG with ``info`` in text chunks: ``parameters`` (all of it, JSON) and one chunk
    per entry. Written beside and renamed, so a failed run leaves no half file."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = PngInfo()
    text.add_text("parameters", json.dumps(info, sort_keys=True))
    for key, value in info.items():
        if value is not None:
            text.add_text(key, json.dumps(value) if isinstance(value, (bool, list)) else str(value))
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        picture.save(partial, format="PNG", pnginfo=text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The ``parameters`` a PNG written by this command carries."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


# ----------------------------------------------------------------------------------------------- run
def colorize_pair(model, inputs: Inputs, options: ColorizeOptions, seed: int, on_step=None):
    """The picture, with ``options`` fully resolved (as :func:`resolve_for_folder` gives them)."""
    background = inputs.background
    return model.colorize(inputs.sketch, inputs.reference, options, seed=seed, background_reference=background,
                          on_step=on_step)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything :func:`main` does but printing the JSON line; raises :class:`InputError` for bad input.
    Cheap checks first (flags, files, images, the model's config), so bad input fails before weights load."""
    started = time.perf_counter()
    options = options_from_args(args)
    seed = check_seed(args.seed)
    out = check_out(args.out)
    check_masker_weights(args.reference_masker_weights, args.sketch_masker_weights)
    device = pick_device(args.device)
    torch_dtype(args.dtype)
    try:
        acceleration = flags.acceleration_from(args, device)
    except ValueError as err:
        raise InputError(str(err)) from None
    inputs = read_inputs(args.sketch, args.reference, args.background,
                         args.line_extractor if args.extract_lines else None)
    sketch_size = (inputs.sketch.shape[1], inputs.sketch.shape[0])
    options = resolve_for_folder(args.model, options, sketch_size, inputs.background is not None)
    reference_masker = None if args.reference_masker_weights is None else (
        args.reference_masker, args.reference_masker_weights)
    masks_given = reference_masker is not None or args.sketch_masker_weights is not None
    masks_used = masks_given and options.splits_attention
    if masks_given and not masks_used:
        print(f"{JOB}: note: the mask models are not loaded: only the plug-in or --background-enhance reads masks",
              file=sys.stderr)
    model = load_model(args.model, device, args.dtype, reference_masker if masks_used else None,
                       args.sketch_masker_weights if masks_used else None)
    accelerated = model.accelerate(acceleration)
    loaded = time.perf_counter()
    on_step, close = step_reporter(args.progress)
    try:
        image = colorize_pair(model, inputs, options, seed, on_step)
    except ValueError as err:  # the model refused the combination (the API's 422)
        raise InputError(_flag_names(_one_line(err))) from None
    finally:
        close()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    done = time.perf_counter()
    used = parameters(options, seed, inputs)
    used["reference_masker"], used["sketch_masker"] = model.masks.names if options.splits_attention else (None, None)
    try:
        write_png(out, image, {**used, "model": Path(args.model).resolve().name, "software": "colorize-xl"})
    except OSError as err:
        raise InputError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return {**used, "out": str(out), "model": str(args.model), "sketch": str(args.sketch),
            "reference": str(args.reference), "background": None if args.background is None else str(args.background),
            "device": device, "dtype": args.dtype, "acceleration": accelerated, "seconds": round(done - loaded, 3),
            "load_seconds": round(loaded - started, 3), "total_seconds": round(time.perf_counter() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except InputError as err:
        print(f"{JOB}: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{JOB}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
