"""Preprocessing as plain functions: one shard of a corpus → rows of training triplets, plus error rows.

Three stages, each a plain function or class so that Ray Data, tests and benches call the same code:

1. :func:`prepare_shard` (CPU, a Ray Data task per shard): read bytes, hash, decode safely, pick the
   aspect bucket, crop the target (and note where the crop lies in the source: the ``crop`` fractions),
   stretch the whole source to the crop's size (the reference view), extract the weight-free sketches and
   masks.
2. :class:`ShardEncoder` (a Ray Data actor, on a GPU when there is one): neural sketches and learned
   masks if configured; the reference mask dilated and binarised; WD-Tagger and OpenCLIP tokens of the
   reference; VAE latents of the target; with the ``background`` view, the background picture (the
   reference with its foreground whitened, what stage 2's ReferenceNet reads): its latents and tokens.
3. :func:`write_shard` (CPU task): the shard's Parquet file, its errors file, then its marker.

A shard flows through the stages as one Arrow table (one row per input), so every stage sees whole
shards and each output file is exactly one shard with a deterministic name. Every input leaves as either
a data row or an error row; :func:`write_shard` refuses to mark a shard whose counts do not add up.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch

from model.config import get_preset
from model.background import REFERENCE_THRESHOLD, dilate_and_binarise, whiten_foreground
from model.geometry import buckets_for, crop_to_bucket, nearest_bucket, resize
from model.image_io import DEFAULT_MAX_PIXELS, DecodeError, content_id, decode_image
from model.line_art import CLASSIC_EXTRACTORS, DEFAULT_EXTRACTORS, invert
from model.masks import reference_foreground, sketch_foreground
from pipelines.data.corpus import InputItem, iter_shard_bytes
from pipelines.data.retries import DEFAULT_RETRIES, RetryPolicy, TransientFailure, call_with_retries
from pipelines.data.layout import DATA, DATA_COLUMNS, ERROR_COLUMNS, ERRORS, MARKERS, shard_file
from pipelines.data.tensor_cells import image_from_cell, tensor_to_bytes
from pipelines.data.writes import write_whole

LATENT_VIEWS = ("target", "background")
# ``background``: the stage-2 columns (background_latents, background_tagger_tokens, background_clip_tokens).

# Encoded images of one input in a shard (the crop as JPEG, four PNG sketches, two PNG masks), measured on
# the corpus at about one megapixel: 0.33 MB (issue 18's review of a 64-image shard).
ENCODED_IMAGE_BYTES = 330_000
# Inputs per shard. 512 makes a shard of the sdxl preset about 0.8 GB of Parquet (1.19 MB of tensors plus
# the encoded images per input, :func:`stored_bytes_per_image`) and a 6M-image corpus 11,719 shards: few
# enough that listing markers and opening files stays cheap (64 made 93,750 files of 100 MB), many enough
# that 64 GPUs each get ~180 shards and a killed run loses under a minute of work per GPU.
DEFAULT_SHARD_SIZE = 512


def stored_bytes_per_image(preset: str, latent_views=("target",), storage_dtype_bytes: int = 2) -> int:
    """Bytes one input adds to a finished shard at the preset's largest bucket: latents, tagger and CLIP
    tokens for each latent view, plus :data:`ENCODED_IMAGE_BYTES`. What sizes a shard (and its write)."""
    config = get_preset(preset)
    pixels = max(w * h for w, h in buckets_for(config))
    latents = config.vae.latent_channels * pixels // config.latent_stride ** 2
    tokens = config.tagger.num_tokens * config.tagger.token_dim + config.clip.num_tokens * config.clip.embed_dim
    return len(latent_views) * (latents + tokens) * storage_dtype_bytes + ENCODED_IMAGE_BYTES


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the dataset's content (stored in its manifest)."""

    preset: str = "tiny"
    shard_size: int = DEFAULT_SHARD_SIZE
    sketch_extractors: tuple[str, ...] = DEFAULT_EXTRACTORS
    extractor_weights: dict[str, str] = field(default_factory=dict)  # neural extractor name → weights path
    segmenter: str | None = None  # learned mask model name; None = weight-free masks
    segmenter_weights: str | None = None
    encoders: str | None = None  # colorize-xl model folder whose tagger, clip and vae encode the dataset
    latent_views: tuple[str, ...] = ("target",)
    storage_dtype: str = "float16"
    encode_batch_size: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    tag_threshold: float = 0.35
    image_column: str = "image"

    def __post_init__(self):
        from pipelines.data.neural_lines import NEURAL_EXTRACTORS

        if len(self.sketch_extractors) < 1:
            raise ValueError("at least one sketch extractor is needed")
        known = set(CLASSIC_EXTRACTORS) | set(NEURAL_EXTRACTORS)
        for name in self.sketch_extractors:
            if name not in known:
                raise ValueError(f"unknown sketch extractor {name!r}; known: {sorted(known)}")
            if name in NEURAL_EXTRACTORS and name not in self.extractor_weights:
                raise ValueError(f"neural extractor {name!r} needs its weights: --extractor-weights {name}=PATH")
        if self.segmenter and not self.segmenter_weights:
            raise ValueError(f"segmenter {self.segmenter!r} needs --segmenter-weights")
        if "reference" in self.latent_views:
            raise ValueError("the 'reference' latent view is gone (dataset schema 3): stage 2 reads the background "
                             "picture (the reference with its foreground whitened) instead; use --latent-views "
                             "target,background")
        unknown_views = set(self.latent_views) - set(LATENT_VIEWS)
        if unknown_views or "target" not in self.latent_views:
            raise ValueError(f"latent views must include 'target' and come from {LATENT_VIEWS}, got {self.latent_views}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------ encodings
def png_bytes(array: np.ndarray, compression: int = 3) -> bytes:
    ok, data = cv2.imencode(".png", array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def bytes_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


# ------------------------------------------------------------------------------------ stage 1: prepare
def _error_row(ordinal: int, item: InputItem, stage: str, reason: str, image_id: str | None = None) -> dict:
    return {"ordinal": ordinal, "source": item.source, "id": image_id, "error": reason, "error_stage": stage}


def prepare_shard(shard: int, items: list[InputItem], cfg: PreprocessConfig,
                  retry: RetryPolicy = DEFAULT_RETRIES) -> pa.Table:
    """CPU stage for one shard: one row per input, ``error`` set where the input failed. Reads that keep
    failing for a temporary reason raise :class:`TransientFailure` (the shard is redone, nothing recorded)."""
    return pa.Table.from_batches(list(prepared_batches(shard, items, cfg, retry)), schema=SHARD_PREPARED_SCHEMA)


def prepare_shard_bytes(shard: int, items: list[InputItem], cfg: PreprocessConfig,
                        retry: RetryPolicy = DEFAULT_RETRIES) -> bytes:
    """:func:`prepare_shard` as Arrow IPC bytes (what travels to the encoder stage), written batch by batch:
    the task holds the shard about once, not as Python rows, then a table, then its bytes."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, SHARD_PREPARED_SCHEMA) as writer:
        for batch in prepared_batches(shard, items, cfg, retry):
            writer.write_batch(batch)
    return sink.getvalue()


PREPARE_BATCH_ROWS = 16  # rows turned into Arrow at a time (a few tens of MB at one megapixel)


def prepared_batches(shard: int, items: list[InputItem], cfg: PreprocessConfig,
                     retry: RetryPolicy = DEFAULT_RETRIES) -> Iterator[pa.RecordBatch]:
    """The prepared rows of one shard, :data:`PREPARE_BATCH_ROWS` at a time (at least one batch)."""
    buckets = buckets_for(get_preset(cfg.preset))
    rows, emitted = [], False
    for ordinal, (item, data) in enumerate(zip(items, iter_shard_bytes(items, cfg.image_column, retry))):
        rows.append(_prepare_row(ordinal, item, data, buckets, cfg))
        del data
        if len(rows) == PREPARE_BATCH_ROWS:
            yield _record_batch(rows, shard)
            rows, emitted = [], True
    if rows or not emitted:
        yield _record_batch(rows, shard)


def _record_batch(rows: list[dict], shard: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{**row, "shard": shard} for row in rows], schema=SHARD_PREPARED_SCHEMA)


def _prepare_row(ordinal: int, item: InputItem, data, buckets, cfg: PreprocessConfig) -> dict:
    if isinstance(data, Exception):
        return _error_row(ordinal, item, "read", f"unreadable: {type(data).__name__}: {data}")
    image_id = content_id(data) if data else None
    try:
        rgb = decode_image(data, max_pixels=cfg.max_pixels)
    except DecodeError as err:
        return _error_row(ordinal, item, "decode", str(err), image_id)
    try:
        return _prepare_one(ordinal, item, image_id, rgb, buckets, cfg)
    except Exception as err:  # noqa: BLE001 - one odd image must not stop its shard
        return _error_row(ordinal, item, "prepare", f"{type(err).__name__}: {err}", image_id)


def crop_fractions(source_width: int, source_height: int, bucket: tuple[int, int]) -> list[float]:
    """Where :func:`model.geometry.crop_to_bucket` takes the target from a source of that size: ``[top, left,
    height, width]`` as fractions of the scaled source's height and width, as the published collate's
    ``gt_transforms(..., crop_ratio=True)`` gives ``ct, cl, rh, rw`` (crop offset and size over the resized
    image's size). The same arithmetic as ``crop_to_bucket`` (a test holds the two together)."""
    width, height = bucket
    scale = max(width / source_width, height / source_height)
    scaled_w, scaled_h = max(width, round(source_width * scale)), max(height, round(source_height * scale))
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    return [top / scaled_h, left / scaled_w, height / scaled_h, width / scaled_w]


def _prepare_one(ordinal, item, image_id, rgb, buckets, cfg: PreprocessConfig) -> dict:
    height, width = rgb.shape[:2]
    bucket = nearest_bucket(width, height, buckets)
    target = crop_to_bucket(rgb, bucket)
    # The reference view: the whole source stretched (aspect ignored) to the target's pixel size, resampled as
    # the target is (area when shrinking, bicubic when growing): the encoders stretch it to their square as
    # they would the source, and stage 2's background picture is it with the foreground whitened.
    reference = resize(rgb, *bucket)
    sketches: list[bytes | None] = []
    drawings = {}
    for name in cfg.sketch_extractors:
        if name in CLASSIC_EXTRACTORS:
            drawings[name] = CLASSIC_EXTRACTORS[name](target)
            sketches.append(png_bytes(invert(drawings[name])))
        else:
            sketches.append(None)  # neural extractors run in the encoder stage
    first_drawing = drawings[cfg.sketch_extractors[0]] if cfg.sketch_extractors[0] in drawings else None
    sketch_mask = sketch_foreground(first_drawing) if first_drawing is not None else reference_foreground(target)
    return {
        "ordinal": ordinal, "source": item.source, "id": image_id, "error": None, "error_stage": None,
        "width": bucket[0], "height": bucket[1], "source_width": width, "source_height": height,
        "image": jpeg_bytes(target, cfg.jpeg_quality),
        "sketches": sketches, "sketch_extractors": list(cfg.sketch_extractors),
        "sketch_mask": png_bytes(sketch_mask), "reference_mask": png_bytes(reference_foreground(reference)),
        "crop": crop_fractions(width, height, bucket),
        "target_png": png_bytes(target, PIXELS_PNG_COMPRESSION),
        "reference_png": png_bytes(reference, PIXELS_PNG_COMPRESSION),
    }


# The target and reference travel to the encoder stage as lossless PNG, not raw RGB: raw pixels were 95% of a
# prepared shard (6.5 MB per image at one megapixel); level 1 is the fast end of zlib (about 0.1 s a
# megapixel) and still keeps 0.02-0.6 of the raw size (flat colour to grain). The encoder sees exactly the
# pixels it saw before, so the dataset is unchanged.
PIXELS_PNG_COMPRESSION = 1
PIXEL_COLUMNS = ("target_png", "reference_png")  # prepared-only: never stored in the dataset


PREPARED_SCHEMA = pa.schema([
    ("ordinal", pa.int32()), ("source", pa.string()), ("id", pa.string()),
    ("error", pa.string()), ("error_stage", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("source_width", pa.int32()), ("source_height", pa.int32()),
    ("image", pa.binary()), ("sketches", pa.list_(pa.binary())), ("sketch_extractors", pa.list_(pa.string())),
    ("sketch_mask", pa.binary()), ("reference_mask", pa.binary()), ("crop", pa.list_(pa.float32())),
    ("target_png", pa.binary()), ("reference_png", pa.binary()),
])
SHARD_PREPARED_SCHEMA = PREPARED_SCHEMA.append(pa.field("shard", pa.int32()))


# ------------------------------------------------------------------------------------- stage 2: encode
class ShardEncoder:
    """Loads the frozen encoders once (per actor) and encodes whole shards.

    Images are grouped by bucket and encoded in mini-batches of ``encode_batch_size``, so a shard of
    mixed aspect ratios still runs in full batches on the GPU.
    """

    def __init__(self, cfg: PreprocessConfig, device: str | None = None, retry: RetryPolicy = DEFAULT_RETRIES):
        from model.colorizer import Colorizer
        from pipelines.data.neural_lines import NEURAL_EXTRACTORS, load_line_extractor

        self.cfg = cfg
        self.retry = retry
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if cfg.encoders:
            model = Colorizer.from_pretrained(cfg.encoders, components=("tagger", "clip", "vae"))
        else:
            raise ValueError("the encoder stage needs --encoders: a colorize-xl model folder holding the frozen "
                             "WD-Tagger, OpenCLIP tower and VAE (see jobs/init_model.py)")
        expected = get_preset(cfg.preset)
        found = model.config.replace(tagger={"num_tags": expected.tagger.num_tags})
        for section in ("tagger", "clip", "vae"):
            if getattr(found, section) != getattr(expected, section):
                raise ValueError(f"the {section} in {cfg.encoders} is not the {cfg.preset!r} preset's: "
                                 f"{getattr(model.config, section)} vs {getattr(expected, section)}")
        self.tagger = model.tagger.to(self.device, self.dtype)
        self.clip = model.clip.to(self.device, self.dtype)
        self.vae = model.vae.to(self.device, self.dtype)
        del model
        self.extractors = {name: load_line_extractor(name, cfg.extractor_weights[name], self.device, self.dtype)
                           for name in cfg.sketch_extractors if name in NEURAL_EXTRACTORS}
        self.segmenter = None
        if cfg.segmenter:
            from model.segmenter import load_segmenter

            self.segmenter = load_segmenter(cfg.segmenter, cfg.segmenter_weights, self.device, self.dtype)

    def __call__(self, batch: dict) -> dict:
        """Ray Data entry: a batch of one prepared shard (Arrow IPC bytes) → the encoded shard."""
        results = {"shard": [], "table": []}
        for shard, data in zip(batch["shard"], batch["table"]):
            results["shard"].append(int(shard))
            results["table"].append(table_to_bytes(self.encode(bytes_to_table(data))))
        return results

    @torch.no_grad()
    def encode(self, prepared: pa.Table) -> pa.Table:
        rows = prepared.to_pylist()
        ok = [r for r in rows if r["error"] is None]
        groups: dict[tuple[int, int], list[dict]] = {}
        for row in ok:
            groups.setdefault((row["width"], row["height"]), []).append(row)
        for (width, height), members in groups.items():
            for start in range(0, len(members), self.cfg.encode_batch_size):
                chunk = members[start:start + self.cfg.encode_batch_size]
                try:  # a CUDA out-of-memory is retried after freeing the cache; spent retries fail the shard
                    prepared_values = [{**r, "sketches": list(r["sketches"])} for r in chunk]
                    call_with_retries(partial(self._encode_chunk_afresh, chunk, prepared_values, width, height),
                                      self.retry, f"encoding {len(chunk)} images of {width}x{height}",
                                      on_retry=self._free_memory)
                except TransientFailure:
                    raise
                except Exception as err:  # noqa: BLE001 - a chunk that fails for what it holds becomes error rows
                    for row in chunk:
                        row["error"], row["error_stage"] = f"{type(err).__name__}: {err}", "encode"
        for row in rows:
            for column in PIXEL_COLUMNS:
                row.pop(column, None)
        return pa.Table.from_pylist(rows, schema=encoded_schema())

    def _encode_chunk_afresh(self, chunk, prepared_values, width, height):
        """:meth:`_encode_chunk` from the prepared values, so that a retry after a failure halfway (it
        rewrites ``reference_mask`` and ``sketches`` in place) starts from what the first try saw."""
        for row, values in zip(chunk, prepared_values):
            row.update(values)
            row["sketches"] = list(values["sketches"])
        self._encode_chunk(chunk, width, height)

    def _free_memory(self, err: BaseException) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _pixels(self, chunk, key, width, height) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] on the encoder's device, from the prepared PNG cells."""
        with ThreadPoolExecutor(max(1, min(len(chunk), torch.get_num_threads()))) as pool:  # OpenCV frees the GIL
            arrays = list(pool.map(image_from_cell, [r[key] for r in chunk]))
        found = {a.shape for a in arrays}
        if found != {(height, width, 3)}:
            raise ValueError(f"prepared {key} cells of the {width}x{height} bucket decode to {sorted(found)}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device, self.dtype) / 255

    def _encode_chunk(self, chunk, width, height):
        from model.vae import encode_latents

        cfg = self.cfg
        target = self._pixels(chunk, "target_png", width, height)
        reference = self._pixels(chunk, "reference_png", width, height)
        for name, extractor in self.extractors.items():
            drawings = (extractor(target.to(self.dtype)).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            position = cfg.sketch_extractors.index(name)
            for row, drawing in zip(chunk, drawings[:, 0]):
                row["sketches"][position] = png_bytes(invert(drawing))
        if self.segmenter is not None:  # soft probabilities, kept soft (8 bits) for the sketch
            sketch_rgb = torch.from_numpy(np.stack([image_from_cell(r["sketches"][0]) for r in chunk]))
            sketch_rgb = (255 - sketch_rgb)[:, None].expand(-1, 3, -1, -1).to(self.device, self.dtype) / 255
            for key, images in (("sketch_mask", sketch_rgb), ("reference_mask", reference)):
                masks = self.segmenter(images).float().clamp(0, 1).cpu().numpy()
                for row, mask in zip(chunk, masks[:, 0]):
                    row[key] = png_bytes(np.round(mask * 255).astype(np.uint8))
        # The reference mask as the background modes use it (dilated, binarised), stored so; the background
        # picture is the reference with that foreground painted white.
        raw = torch.from_numpy(np.stack([image_from_cell(r["reference_mask"]) for r in chunk]))[:, None]
        reference_mask = dilate_and_binarise(raw.float() / 255)
        for row, mask in zip(chunk, reference_mask[:, 0].numpy()):
            row["reference_mask"] = png_bytes((mask * 255).astype(np.uint8))
        tagged = self.tagger(reference)
        clip_tokens = self.clip(reference)
        probabilities = torch.sigmoid(tagged.logits.float()).cpu()
        latents = {"target": encode_latents(self.vae, target * 2 - 1)}
        if "background" in cfg.latent_views:
            background = whiten_foreground(reference.float() * 2 - 1, reference_mask.to(self.device),
                                           REFERENCE_THRESHOLD).to(self.dtype)
            latents["background"] = encode_latents(self.vae, background)
            background_tagger = self.tagger((background + 1) / 2).tokens
            background_clip = self.clip((background + 1) / 2)
        for i, row in enumerate(chunk):
            row["tagger_tokens"], row["tagger_tokens_shape"] = tensor_to_bytes(tagged.tokens[i], cfg.storage_dtype)
            row["clip_tokens"], row["clip_tokens_shape"] = tensor_to_bytes(clip_tokens[i], cfg.storage_dtype)
            row["latents"], row["latents_shape"] = tensor_to_bytes(latents["target"][i], cfg.storage_dtype)
            if "background" in latents:  # shapes: those of latents, tagger_tokens and clip_tokens
                row["background_latents"], _ = tensor_to_bytes(latents["background"][i], cfg.storage_dtype)
                row["background_tagger_tokens"], _ = tensor_to_bytes(background_tagger[i], cfg.storage_dtype)
                row["background_clip_tokens"], _ = tensor_to_bytes(background_clip[i], cfg.storage_dtype)
            row["tags"] = [self.tagger.tags[j] for j in torch.nonzero(probabilities[i] >= cfg.tag_threshold).flatten().tolist()]
            row["tensor_dtype"] = cfg.storage_dtype


def encoded_schema() -> pa.Schema:
    """Schema of a stage-2 shard: data and error rows together (``error`` null for data rows)."""
    fields = [f for f in PREPARED_SCHEMA if f.name not in PIXEL_COLUMNS]
    shape = pa.list_(pa.int32())
    return pa.schema(fields + [
        ("tagger_tokens", pa.binary()), ("tagger_tokens_shape", shape),
        ("clip_tokens", pa.binary()), ("clip_tokens_shape", shape),
        ("latents", pa.binary()), ("latents_shape", shape), ("background_latents", pa.binary()),
        ("background_tagger_tokens", pa.binary()), ("background_clip_tokens", pa.binary()),
        ("tags", pa.list_(pa.string())), ("tensor_dtype", pa.string()), ("shard", pa.int32()),
    ])


# -------------------------------------------------------------------------------------- stage 3: write
def write_shard(output: str, shard: int, encoded: pa.Table, expected_inputs: int) -> dict:
    """Write ``data/``, ``errors/`` and finally ``markers/`` for one shard; returns the marker. Each file is
    written whole (:func:`pipelines.data.writes.write_whole`: straight to an object store, through a temporary
    file and a rename elsewhere) and the marker last, so a shard killed halfway is redone, never taken as done."""
    started = time.perf_counter()
    is_error = pa.compute.invert(pa.compute.is_null(encoded.column("error")))
    errors = encoded.filter(is_error).select(list(ERROR_COLUMNS))
    data = encoded.filter(pa.compute.invert(is_error)).select(list(DATA_COLUMNS))
    if data.num_rows + errors.num_rows != expected_inputs:
        raise RuntimeError(f"shard {shard}: {data.num_rows} rows + {errors.num_rows} errors != {expected_inputs} inputs")
    fs, root = fsspec.core.url_to_fs(output)
    _write_table(fs, shard_file(root, DATA, shard), data)
    _write_table(fs, shard_file(root, ERRORS, shard), errors)
    marker = {"shard": shard, "inputs": expected_inputs, "rows": data.num_rows, "errors": errors.num_rows,
              "bytes": {c: int(data.column(c).nbytes) for c in data.column_names},
              "buckets": dict(Counter(f"{w}x{h}" for w, h in zip(data.column("width").to_pylist(),
                                                                 data.column("height").to_pylist()))),
              "write_seconds": round(time.perf_counter() - started, 3)}
    write_whole(fs, shard_file(root, MARKERS, shard), json.dumps(marker, indent=1).encode())
    return marker


def _write_table(fs, path: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(64, table.num_rows)))
    write_whole(fs, path, sink.getvalue())


def process_shard(output: str, shard: int, items: list[InputItem], cfg: PreprocessConfig,
                  encoder: ShardEncoder) -> dict:
    """All three stages in this process (tests, benches, a debugger); the Ray job runs them as stages."""
    return write_shard(output, shard, encoder.encode(prepare_shard(shard, items, cfg)), len(items))
