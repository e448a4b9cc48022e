"""The batch job's three stages as plain functions, so that Ray Data, tests and benches run the same code.

1. :func:`prepare_unit` (CPU task): read each pair's files, decode them safely, extract the sketch's lines
   when its settings ask; a reference or background shared by several pairs of the unit is read and
   decoded once (keyed by its content id).
2. :class:`UnitColorizer` (an actor, on a GPU when there is one): groups the unit's pairs by their
   resolved options and output size, and colors each group in batches of ``batch_size`` with one
   ``Colorizer.colorize_batch`` call each. Without split attention the references' contexts are computed
   once per reference (``encode_reference``) and kept across units (an LRU of ``context_cache``), so a
   thousand frames after one character sheet encode it once per actor. Each pair's noise comes from its
   own seed, so its picture does not depend on what it was batched with.
3. :func:`write_unit` (CPU task): each PNG (written, then renamed), then the unit's marker with its index
   and error rows.

A unit travels between the stages as one dict (pickled by Ray): ``unit``, ``inputs`` and ``items``, one per
pair in plan order, each with its pair, its ``error`` (None, or the error row) and what the stage added.
Every pair leaves as an index row or an error row; :func:`write_unit` refuses to mark a unit whose counts do
not add up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, OrderedDict

import cv2
import fsspec
import numpy as np

from model.image_io import DEFAULT_MAX_PIXELS, DecodeError, content_id, decode_image
from model.line_art import extract_drawing
from pipelines.inference.layout import fs_root, image_path, marker_path, output_uri, write_bytes
from pipelines.inference.pairs import Pair, line_extractor_of, pair_to_json, settings_options


class StageError(Exception):
    def __init__(self, stage: str, source: str, reason: str):
        super().__init__(reason)
        self.stage, self.source, self.reason = stage, source, reason


def error_row(pair: dict, source: str, stage: str, reason: str, unit: int) -> dict:
    return {"pair_id": pair["pair_id"], "input": source, "stage": stage, "reason": reason[:1000], "unit": unit,
            "row": pair["row"]}


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]


# ------------------------------------------------------------------------------------- stage 1: prepare
def read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StageError("read", url, "not found") from None
    except Exception as err:  # noqa: BLE001 - any filesystem's failure is this input's, not the job's
        raise StageError("read", url, f"unreadable: {_short(err)}") from None


def decode(url: str, max_pixels: int) -> tuple[str, np.ndarray]:
    """The file's content id and its RGB pixels, or a :class:`StageError` (``read`` or ``decode``)."""
    data = read_bytes(url)
    try:
        return content_id(data), decode_image(data, max_pixels=max_pixels)
    except DecodeError as err:
        raise StageError("decode", url, str(err)) from None


def prepare_unit(unit: int, pairs: list[Pair], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read and decode one unit's pairs: ``items`` (each with ``sketch`` pixels and the content ids of its
    ``reference`` and ``background``) and ``images`` (content id → pixels, each shared picture once)."""
    images: dict[str, np.ndarray] = {}
    seen: dict[str, str | StageError] = {}  # url → content id (or why it failed), within this unit

    def shared(url: str) -> str:
        if url not in seen:
            try:
                key, pixels = decode(url, max_pixels)
                images.setdefault(key, pixels)
                seen[url] = key
            except StageError as err:
                seen[url] = err
        if isinstance(seen[url], StageError):
            raise seen[url]
        return seen[url]

    items = []
    for pair in pairs:
        item = {"pair": pair_to_json(pair), "error": None}
        items.append(item)
        if pair.invalid:
            item["error"] = error_row(item["pair"], pair.sketch or pair.reference, "input", pair.invalid, unit)
            continue
        try:
            _, sketch = decode(pair.sketch, max_pixels)
            item["reference_key"] = shared(pair.reference)
            item["background_key"] = shared(pair.background) if pair.background else None
            extractor = line_extractor_of(json.loads(pair.settings))
            if extractor is not None:
                try:
                    sketch = extract_drawing(sketch, extractor)
                except Exception as err:  # noqa: BLE001 - one odd image must not stop its unit
                    raise StageError("prepare", pair.sketch, f"line extraction ({extractor}) failed: {_short(err)}")
            item["sketch"] = sketch
        except StageError as err:
            item["error"] = error_row(item["pair"], err.source, err.stage, err.reason, unit)
    return {"unit": unit, "inputs": len(pairs), "items": items, "images": images}


# ------------------------------------------------------------------------------------ stage 2: colorize
def resolve_device(device: str | None = None, dtype: str | None = None):
    """CUDA in bf16 when there is one (and nothing else is asked), else CPU in fp32."""
    import torch

    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in (None, "auto"):
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, getattr(torch, dtype)


class UnitColorizer:
    """A loaded :class:`~model.colorizer.Colorizer` that colors prepared units (one per actor)."""

    def __init__(self, model, batch_size: int = 8, context_cache: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.context_cache = context_cache
        self._contexts: OrderedDict = OrderedDict()
        self.stats = Counter()  # calls, pairs, contexts_encoded, contexts_reused

    @classmethod
    def load(cls, folder: str, device: str | None = None, dtype: str | None = None, acceleration: dict | None = None,
             **kwargs) -> UnitColorizer:
        """``acceleration``: :meth:`model.acceleration.Acceleration.from_flags` arguments but the device."""
        from model.acceleration import Acceleration
        from model.colorizer import Colorizer

        chosen, torch_dtype = resolve_device(device, dtype)
        model = Colorizer.from_pretrained(folder, device=chosen, dtype=torch_dtype)
        model.accelerate(Acceleration.from_flags(**(acceleration or {}), device=chosen))
        return cls(model, **kwargs)

    def colorize(self, prepared: dict) -> dict:
        """A prepared unit → the same items with ``pixels`` (H, W, 3 uint8), ``parameters``, ``seconds`` and
        ``batch``, or their ``error``. ``images`` is dropped (it is not needed downstream)."""
        unit, items, images = prepared["unit"], prepared["items"], prepared["images"]
        groups: dict = {}
        for item in items:
            if item["error"] is not None:
                continue
            pair = item["pair"]
            settings = json.loads(pair["settings"])
            try:
                options = self.model.resolve(settings_options(settings))
                height, width = item["sketch"].shape[:2]
                options = dataclasses.replace(options, size=self.model.output_size((width, height), options.size))
                if item["background_key"] is not None and not options.splits_attention:
                    raise ValueError("a background picture needs the plug-in or background_enhance; both are off")
            except ValueError as err:
                item["error"] = error_row(pair, pair["sketch"], "options", str(err), unit)
                continue
            item["parameters"] = json.dumps({**_jsonable(dataclasses.asdict(options)),
                                             "line_extractor": line_extractor_of(settings)}, sort_keys=True)
            groups.setdefault(options, []).append(item)
        for options, members in groups.items():
            members.sort(key=lambda it: (it["reference_key"], it["background_key"] or ""))  # stable: plan order
            for start in range(0, len(members), self.batch_size):
                self._run(members[start:start + self.batch_size], options, images, unit)
        for item in items:
            item.pop("sketch", None)
        return {"unit": unit, "inputs": prepared["inputs"], "items": items}

    def _run(self, chunk: list[dict], options, images: dict, unit: int) -> None:
        started = time.perf_counter()
        try:
            outputs = self._call(chunk, options, images)
        except Exception as err:  # noqa: BLE001 - a failing call fails its pairs, not the job
            if len(chunk) > 1:  # alone, each pair either succeeds or names its own failure
                for item in chunk:
                    self._run([item], options, images, unit)
                return
            chunk[0]["error"] = error_row(chunk[0]["pair"], chunk[0]["pair"]["sketch"], "colorize", _short(err), unit)
            return
        seconds = (time.perf_counter() - started) / len(chunk)
        self.stats.update(calls=1, pairs=len(chunk))
        for item, image in zip(chunk, outputs):
            item["pixels"] = np.asarray(image, dtype=np.uint8)
            item["seconds"], item["batch"] = seconds, len(chunk)

    def _call(self, chunk: list[dict], options, images: dict):
        import torch

        references = [images[it["reference_key"]] for it in chunk]
        backgrounds = None
        if any(it["background_key"] for it in chunk):
            backgrounds = [images[it["background_key"]] if it["background_key"] else None for it in chunk]
        contexts = None
        if not options.splits_attention:  # split attention encodes the background picture with it
            contexts = torch.cat([self.context(it["reference_key"], images) for it in chunk])
        return self.model.colorize_batch([it["sketch"] for it in chunk], references, options,
                                         seeds=[int(it["pair"]["seed"]) for it in chunk],
                                         background_references=backgrounds, contexts=contexts)

    def context(self, key: str, images: dict):
        """The reference's context (1, N, D), encoded once and kept (LRU over the last ``context_cache``)."""
        from model.images import image_to_tensor

        if key in self._contexts:
            self._contexts.move_to_end(key)
            self.stats.update(contexts_reused=1)
            return self._contexts[key]
        context = self.model.encode_reference([image_to_tensor(images[key])])
        self.stats.update(contexts_encoded=1)
        self._contexts[key] = context
        while len(self._contexts) > max(1, self.context_cache):
            self._contexts.popitem(last=False)
        return context


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------- stage 3: write
def png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def write_unit(output: str, colorized: dict) -> dict:
    """Each pair's PNG, then the unit's marker (its index and error rows); returns the counts."""
    fs, root = fs_root(output)
    unit, rows, errors = colorized["unit"], [], []
    for item in colorized["items"]:
        pair = item["pair"]
        if item["error"] is None and item.get("pixels") is None:
            item["error"] = error_row(pair, pair["sketch"], "colorize", "no picture came back", unit)
        if item["error"] is not None:
            errors.append(item["error"])
            continue
        path = image_path(root, pair["pair_id"])
        pixels = item["pixels"]
        try:
            write_bytes(fs, path, png_bytes(pixels))
        except Exception as err:  # noqa: BLE001 - an unwritable output fails its pair
            errors.append(error_row(pair, output_uri(fs, path), "write", _short(err), unit))
            continue
        rows.append({"pair_id": pair["pair_id"], "sketch": pair["sketch"], "reference": pair["reference"],
                     "background": pair["background"], "seed": pair["seed"], "width": int(pixels.shape[1]),
                     "height": int(pixels.shape[0]), "parameters": item["parameters"],
                     "output": output_uri(fs, path), "seconds": round(float(item["seconds"]), 4),
                     "batch": item["batch"], "unit": unit, "row": pair["row"]})
    if len(rows) + len(errors) != colorized["inputs"]:
        raise RuntimeError(f"unit {unit}: {len(rows)} rows + {len(errors)} errors != {colorized['inputs']} inputs")
    marker = {"unit": unit, "inputs": colorized["inputs"], "rows": rows, "errors": errors}
    write_bytes(fs, marker_path(root, unit), json.dumps(marker, sort_keys=True).encode())
    return {"unit": unit, "inputs": colorized["inputs"], "rows": len(rows), "errors": len(errors)}


def process_unit(output: str, unit: int, pairs: list[Pair], colorizer: UnitColorizer,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """All three stages in this process (tests, benches, small jobs); the Ray job runs them as stages."""
    return write_unit(output, colorizer.colorize(prepare_unit(unit, pairs, max_pixels)))
