"""The preprocess job's functions and its Ray Data run on a local Ray (2 CPUs), tiny preset."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from model.config import tiny  # noqa: E402
from pipelines.data.synthetic import write_corpus  # noqa: E402
from pipelines.data.layout import completed_shards, read_all  # noqa: E402
from pipelines.data.layout import DATA_COLUMNS  # noqa: E402
from pipelines.data.shards import PreprocessConfig, ShardEncoder, process_shard  # noqa: E402
from pipelines.data.corpus import list_inputs, plan_shards, read_shard_bytes  # noqa: E402
from pipelines.data.tensor_cells import bytes_to_tensor, tensor_to_bytes  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocess")
    corpus = write_corpus(root / "corpus", count=10, with_bad_files=True)
    from model.assembly import init_model

    encoders = init_model(root / "base", "tiny", seed=0)
    return {"root": root, "corpus": Path(corpus["corpus"]), "encoders": encoders, "bad": corpus["bad_files"]}


@pytest.fixture(scope="module")
def config(workspace):
    return PreprocessConfig(preset="tiny", shard_size=4, encoders=str(workspace["encoders"]))


def test_listing_is_recursive_case_insensitive_and_sorted(workspace):
    listing = list_inputs(str(workspace["corpus"]))
    sources = [it.source for it in listing.items]
    assert len(sources) == 10 + workspace["bad"] and sources == sorted(sources)
    assert any(s.endswith(".JPG") for s in sources) and any(s.startswith("set1/") for s in sources)
    assert listing.ignored == 1  # broken/README.txt
    shards = plan_shards(listing.items, 4)
    assert [len(s) for s in shards] == [4, 4, 4, 3]


def test_parquet_corpus_reads_bytes_by_row(workspace, tmp_path):
    files = sorted(p for p in workspace["corpus"].rglob("*") if p.suffix.lower() in (".png", ".jpg"))[:5]
    table = pa.table({"key": [f"k{i}" for i in range(5)], "image": [p.read_bytes() for p in files]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    listing = list_inputs(f"file://{tmp_path}")
    assert listing.kind == "parquet" and [it.source for it in listing.items] == ["k0", "k1", "k2", "k3", "k4"]
    data = read_shard_bytes(listing.items[3:5])
    assert data == [files[3].read_bytes(), files[4].read_bytes()]


def test_tensor_cells_round_trip_in_both_dtypes():
    import torch

    value = torch.randn(3, 5)
    for dtype, tolerance in (("float16", 1e-3), ("bfloat16", 1e-2)):
        data, shape = tensor_to_bytes(value, dtype)
        assert len(data) == 30 and shape == [3, 5]
        torch.testing.assert_close(bytes_to_tensor(data, shape, dtype), value, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="needs 30"):
        bytes_to_tensor(b"\0" * 8, [3, 5])


def test_one_shard_accounts_for_every_input(workspace, config, tmp_path):
    items = list_inputs(str(workspace["corpus"])).items[:6]  # broken/* first: 5 bad + 1 good
    encoder = ShardEncoder(config)
    marker = process_shard(str(tmp_path), 0, items, config, encoder)
    assert marker["rows"] + marker["errors"] == marker["inputs"] == 6
    assert marker["errors"] == workspace["bad"]
    errors = pq.read_table(tmp_path / "errors" / "shard-00000.parquet").to_pylist()
    reasons = {row["source"]: row["error"] for row in errors}
    assert reasons["broken/empty.png"] == "empty file"
    assert "truncated" in reasons["broken/truncated.png"] and "too small" in reasons["broken/tiny.png"]

    data = pq.read_table(tmp_path / "data" / "shard-00000.parquet")
    assert tuple(data.column_names) == DATA_COLUMNS
    row = data.to_pylist()[0]
    cfg = tiny()
    assert (row["width"], row["height"]) in [(96, 160), (128, 128), (160, 96)]
    assert row["sketch_extractors"] == ["xdog", "blur_difference", "canny", "highpass"]
    sketches = [np.asarray(Image.open(io.BytesIO(s))) for s in row["sketches"]]
    assert all(s.shape == (row["height"], row["width"]) for s in sketches)
    assert all(s.mean() < 100 for s in sketches)  # stored inverted: bright lines on a dark field
    latents = bytes_to_tensor(row["latents"], row["latents_shape"], row["tensor_dtype"])
    assert tuple(latents.shape) == (cfg.vae.latent_channels, row["height"] // 8, row["width"] // 8)
    tagger = bytes_to_tensor(row["tagger_tokens"], row["tagger_tokens_shape"])
    assert tuple(tagger.shape) == (cfg.tagger.num_tokens, cfg.tagger.token_dim)
    clip = bytes_to_tensor(row["clip_tokens"], row["clip_tokens_shape"])
    assert tuple(clip.shape) == (cfg.clip.num_tokens, cfg.clip.embed_dim)
    image = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert image.shape == (row["height"], row["width"], 3)
    for key in ("sketch_mask", "reference_mask"):  # the weight-free masks are binary
        mask = np.asarray(Image.open(io.BytesIO(row[key])))
        assert mask.shape == (row["height"], row["width"]) and set(np.unique(mask)) <= {0, 255}
    assert len(row["crop"]) == 4 and all(0 <= v <= 1 for v in row["crop"])
    assert row["background_latents"] is None and row["background_clip_tokens"] is None  # target view only


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # its own, not a running one
    yield ray
    ray.shutdown()


def test_ray_run_writes_every_shard_then_a_rerun_writes_nothing(workspace, config, local_ray, tmp_path):
    from pipelines.data.ray_stream import ClusterOptions, run_preprocess

    output = str(tmp_path / "dataset")
    options = ClusterOptions(prepare_tasks=1)  # a capped task pool and the declared memory, on a real Ray
    manifest = run_preprocess(str(workspace["corpus"]), output, config, options)
    assert manifest["complete"] and manifest["inputs"] == 10 + workspace["bad"]
    assert manifest["rows"] == 10 and manifest["errors"] == workspace["bad"]
    assert sum(manifest["buckets"].values()) == 10
    assert manifest["bytes_per_image"]["latents"] > 0
    assert len(completed_shards(output)) == manifest["shards"] == 4
    from pipelines.data.layout import read_marker_index

    assert read_marker_index(output) == completed_shards(output)  # the driver indexed the markers it was sent
    assert sorted(read_all(output, ["source"]).column("source").to_pylist()) == sorted(
        it.source for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/"))

    files = sorted(p for p in Path(output).rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    again = run_preprocess(str(workspace["corpus"]), output, config)
    assert again == manifest
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files} == before
    assert sorted(p for p in Path(output).rglob("*") if p.is_file()) == files

    with pytest.raises(ValueError, match="shard_size"):
        run_preprocess(str(workspace["corpus"]), output, PreprocessConfig(
            preset="tiny", shard_size=5, encoders=config.encoders))


def test_config_refuses_unknown_extractors_and_missing_weights(workspace):
    with pytest.raises(ValueError, match="unknown sketch extractor 'pencil'"):
        PreprocessConfig(sketch_extractors=("pencil",))
    with pytest.raises(ValueError, match="needs its weights"):
        PreprocessConfig(sketch_extractors=("xdog", "anime2sketch"))
    assert json.dumps(PreprocessConfig().to_json())
    assert os.path.isdir(workspace["encoders"])


def test_a_neural_extractor_runs_in_the_encoder_stage(workspace, tmp_path):
    """informative_drawings at its published size (4.3M parameters, random init) saved as the published
    file, selected by name: its sketches come from the encoder stage, the classic ones from the CPU stage."""
    import torch

    from pipelines.data.neural_lines import build_line_network

    torch.manual_seed(0)
    weights = tmp_path / "sk_model.pth"
    torch.save(build_line_network("informative_drawings").state_dict(), weights)
    cfg = PreprocessConfig(preset="tiny", shard_size=4, encoders=str(workspace["encoders"]),
                           sketch_extractors=("xdog", "informative_drawings", "canny", "highpass"),
                           extractor_weights={"informative_drawings": str(weights)})
    items = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")][:2]
    marker = process_shard(str(tmp_path / "out"), 0, items, cfg, ShardEncoder(cfg))
    assert marker["rows"] == 2 and marker["errors"] == 0
    row = pq.read_table(tmp_path / "out" / "data" / "shard-00000.parquet").to_pylist()[0]
    assert row["sketch_extractors"] == ["xdog", "informative_drawings", "canny", "highpass"]
    neural = np.asarray(Image.open(io.BytesIO(row["sketches"][1])))
    assert neural.shape == (row["height"], row["width"]) and neural.dtype == np.uint8
    assert not np.array_equal(neural, np.asarray(Image.open(io.BytesIO(row["sketches"][0]))))


# ------------------------------------------------------------------------------------- stage-2 columns
def test_crop_fractions_place_a_known_crop_in_the_source():
    """A 300×200 source in the 160×96 bucket: scaled to 160×107 (cover), 5 rows off the top (centred),
    so [top, left, height, width] = [5/107, 0, 96/107, 1]; and those fractions cut crop_to_bucket's target
    out of the scaled source exactly (the published ct, cl, rh, rw over the resized image)."""
    from model.geometry import crop_to_bucket, resize
    from pipelines.data.shards import crop_fractions

    assert crop_fractions(300, 200, (160, 96)) == pytest.approx([5 / 107, 0.0, 96 / 107, 1.0])
    assert crop_fractions(200, 300, (96, 160)) == pytest.approx([0.0, 5 / 107, 1.0, 96 / 107])
    assert crop_fractions(256, 256, (128, 128)) == [0.0, 0.0, 1.0, 1.0]
    rng = np.random.default_rng(0)
    for (width, height), bucket in (((300, 200), (160, 96)), ((181, 397), (96, 160)), ((500, 130), (160, 96))):
        source = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        top, left, rh, rw = crop_fractions(width, height, bucket)
        scaled_h, scaled_w = round(bucket[1] / rh), round(bucket[0] / rw)
        scaled = resize(source, scaled_w, scaled_h)
        y, x = round(top * scaled_h), round(left * scaled_w)
        np.testing.assert_array_equal(scaled[y:y + bucket[1], x:x + bucket[0]], crop_to_bucket(source, bucket))


def test_the_reference_view_is_refused_with_what_replaced_it():
    with pytest.raises(ValueError, match="'reference' latent view is gone.*--latent-views target,background"):
        PreprocessConfig(latent_views=("target", "reference"))
    with pytest.raises(ValueError, match="must include 'target'"):
        PreprocessConfig(latent_views=("background",))
    assert PreprocessConfig(latent_views=("target", "background")).latent_views == ("target", "background")


@pytest.fixture(scope="module")
def stage2_shard(workspace, tmp_path_factory):
    """Two good inputs preprocessed with the background view: (config, encoder, rows, items)."""
    cfg = PreprocessConfig(preset="tiny", shard_size=4, encoders=str(workspace["encoders"]),
                           latent_views=("target", "background"))
    items = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")][:2]
    out = tmp_path_factory.mktemp("stage2")
    encoder = ShardEncoder(cfg)
    assert process_shard(str(out), 0, items, cfg, encoder)["rows"] == 2
    return cfg, encoder, pq.read_table(out / "data" / "shard-00000.parquet").to_pylist(), items


def source_of(workspace, item) -> np.ndarray:
    from model.image_io import decode_image

    return decode_image((workspace["corpus"] / item.source).read_bytes())


def test_the_background_columns_hold_the_whitened_stretched_reference(workspace, stage2_shard):
    """Recomputed independently from the source image: the reference stretched to the crop's size, its
    stored (dilated, binary) mask, the foreground painted white → the stored latents and tokens."""
    import torch

    from model.background import dilate_and_binarise, whiten_foreground
    from model.geometry import resize
    from model.masks import reference_foreground
    from model.vae import encode_latents

    cfg, encoder, rows, items = stage2_shard
    for row, item in zip(rows, items):
        assert row["source"] == item.source
        source = source_of(workspace, item)
        assert (row["source_height"], row["source_width"]) == source.shape[:2]
        width, height = row["width"], row["height"]
        reference = resize(source, width, height)  # aspect ignored: the whole source, stretched
        raw = torch.from_numpy(reference_foreground(reference).astype(np.float32) / 255)[None, None]
        stored = np.asarray(Image.open(io.BytesIO(row["reference_mask"])))
        np.testing.assert_array_equal(stored, dilate_and_binarise(raw)[0, 0].numpy().astype(np.uint8) * 255)
        assert stored.mean() > np.asarray(reference_foreground(reference)).mean()  # dilated
        pixels = torch.from_numpy(reference).permute(2, 0, 1)[None].float() / 255
        mask = torch.from_numpy(stored.astype(np.float32) / 255)[None, None]
        background = whiten_foreground(pixels * 2 - 1, mask)
        assert (background[0][:, stored > 0] == 1).all()
        with torch.no_grad():
            latents = encode_latents(encoder.vae, background)
            clip, tagger = encoder.clip((background + 1) / 2), encoder.tagger((background + 1) / 2).tokens
            own_clip = encoder.clip(pixels)
        for column, shape_column, expected in (("background_latents", "latents_shape", latents),
                                               ("background_clip_tokens", "clip_tokens_shape", clip),
                                               ("background_tagger_tokens", "tagger_tokens_shape", tagger)):
            value = bytes_to_tensor(row[column], row[shape_column], row["tensor_dtype"])
            torch.testing.assert_close(value, expected[0].float(), rtol=1e-2, atol=1e-2)
        # the reference's own tokens are of the stretched reference (not whitened)
        torch.testing.assert_close(bytes_to_tensor(row["clip_tokens"], row["clip_tokens_shape"]), own_clip[0],
                                   rtol=1e-2, atol=1e-2)
        from pipelines.data.shards import crop_fractions

        assert row["crop"] == pytest.approx(crop_fractions(source.shape[1], source.shape[0], (width, height)))


def test_stage2_columns_decode_into_the_training_batch(stage2_shard):
    import random

    import torch

    from pipelines.data.batches import collate, decode_sample

    _, _, rows, _ = stage2_shard
    row = rows[0]
    sample = decode_sample(row, random.Random(0), 7.0, stage="plugin")
    batch = collate([sample])
    height, width = row["height"], row["width"]
    assert batch.background_latents.shape == batch.latents.shape
    assert batch.background_clip_tokens.shape == batch.clip_tokens.shape
    assert batch.background_tagger_tokens.shape == batch.tagger_tokens.shape
    assert batch.crop.shape == (1, 4) and batch.crop[0].tolist() == pytest.approx(row["crop"])
    for key in ("sketch_mask", "reference_mask"):
        mask = getattr(batch, key)
        stored = np.asarray(Image.open(io.BytesIO(row[key]))).astype(np.float32) / 255
        assert mask.shape == (1, 1, height, width) and mask.dtype == torch.float32
        np.testing.assert_array_equal(mask[0, 0].numpy(), stored)
    torch.testing.assert_close(batch.background_latents[0],
                               bytes_to_tensor(row["background_latents"], row["latents_shape"]))
    backbone = collate([decode_sample(row, random.Random(0), 7.0)])
    assert backbone.background_latents is None and backbone.crop is None


class ConstantSegmenter:
    """A stand-in learned segmenter: the same foreground probability everywhere."""

    def __init__(self, probability: float):
        self.probability = probability

    def __call__(self, images):
        import torch

        return torch.full((images.shape[0], 1, *images.shape[-2:]), self.probability)


@pytest.mark.parametrize("probability", [0.3, 0.7])
def test_a_learned_sketch_mask_stays_soft_and_the_reference_mask_decides_the_whitening(
        workspace, stage2_shard, tmp_path, probability):
    import torch

    cfg, encoder, rows, items = stage2_shard
    encoder.segmenter = ConstantSegmenter(probability)
    try:
        process_shard(str(tmp_path), 0, items[:1], cfg, encoder)
    finally:
        encoder.segmenter = None
    row = pq.read_table(tmp_path / "data" / "shard-00000.parquet").to_pylist()[0]
    sketch_mask = np.asarray(Image.open(io.BytesIO(row["sketch_mask"])))
    assert set(np.unique(sketch_mask)) == {round(probability * 255)}  # soft, 8 bits
    reference_mask = np.asarray(Image.open(io.BytesIO(row["reference_mask"])))
    assert set(np.unique(reference_mask)) == {255 if probability > 0.5 else 0}  # dilated and binarised
    from model.vae import encode_latents

    stored = bytes_to_tensor(row["background_latents"], row["latents_shape"])
    if probability > 0.5:  # all foreground: the background picture is white paper
        expected = torch.ones(1, 3, row["height"], row["width"])
    else:  # no foreground: the background picture is the reference itself
        from model.geometry import resize

        reference = resize(source_of(workspace, items[0]), row["width"], row["height"])
        expected = torch.from_numpy(reference).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(stored, encode_latents(encoder.vae, expected)[0], rtol=1e-2, atol=1e-2)


def test_datasets_of_schema_version_2_are_refused_with_the_reason_and_what_to_do(tmp_path):
    from pipelines.data.layout import SCHEMA_VERSION, check_config, check_schema, finished_manifest, read_all

    assert SCHEMA_VERSION == 3
    old = tmp_path / "v2"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"schema_version": 2, "complete": True}))
    for read in (finished_manifest, check_schema, read_all):
        with pytest.raises(ValueError, match="schema version 2.*background_latents.*reference_latents.*"
                                             "Preprocess the corpus again into a new --out.*target,background"):
            read(str(old))
    in_progress = tmp_path / "in_progress"
    in_progress.mkdir()
    cfg = PreprocessConfig()
    (in_progress / "config.json").write_text(json.dumps({"schema_version": 2, **cfg.to_json()}))
    with pytest.raises(ValueError, match="schema version 2"):
        check_config(str(in_progress), cfg)


# --------------------------------------------------------------------------- temporary failures (issue 18.9)
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from pipelines.data.retries import RetryPolicy, TransientFailure, call_with_retries, is_transient  # noqa: E402

FAST_RETRIES = RetryPolicy(attempts=3, base_seconds=0.001, max_seconds=0.002)


class FlakyMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose opens of a path fail ``failures[path]`` times, the way S3 answers a
    503 SlowDown through s3fs (an OSError with EBUSY), before reading normally. The store is its own."""

    protocol = "flakymem"
    store: dict = {}
    pseudo_dirs = [""]
    failures: dict = {}
    opens: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flakymem://"))

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        self.opens[path] = self.opens.get(path, 0) + 1
        if self.failures.get(path, 0) > 0:  # reads and writes alike
            self.failures[path] -= 1
            import errno

            raise OSError(errno.EBUSY, "503 SlowDown: please reduce your request rate", path)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)


@pytest.fixture
def flaky_corpus(request):
    """One good image, one corrupt one, on the flaky filesystem: (items, fs paths)."""
    from pipelines.data.synthetic import synthetic_illustration

    fs = FlakyMemoryFileSystem()
    png = io.BytesIO()
    Image.fromarray(synthetic_illustration(seed=3, width=160, height=128).color).save(png, format="PNG")
    folder = f"/{request.node.name}"
    fs.pipe(f"{folder}/good.png", png.getvalue())
    fs.pipe(f"{folder}/corrupt.png", png.getvalue()[:200])
    items = list_inputs(f"flakymem://{folder}").items
    assert [it.source for it in items] == ["corrupt.png", "good.png"]
    FlakyMemoryFileSystem.opens.clear()  # count only what the stages open
    return items, {"good": f"{folder}/good.png", "corrupt": f"{folder}/corrupt.png"}


def test_a_read_that_fails_twice_is_retried_and_a_corrupt_image_still_is_an_error(flaky_corpus):
    from pipelines.data.shards import prepare_shard

    items, paths = flaky_corpus
    FlakyMemoryFileSystem.failures[paths["good"]] = 2
    table = prepare_shard(0, items, PreprocessConfig(preset="tiny"), FAST_RETRIES).to_pylist()
    rows = {row["source"]: row for row in table}
    assert FlakyMemoryFileSystem.opens[paths["good"]] == 3  # two 503s, then the read
    assert rows["good.png"]["error"] is None and rows["good.png"]["width"] > 0
    assert rows["corrupt.png"]["error_stage"] == "decode" and "truncated" in rows["corrupt.png"]["error"]
    assert FlakyMemoryFileSystem.opens[paths["corrupt"]] == 1  # a bad input is not retried


def test_spent_retries_leave_the_shard_unmarked_for_the_next_run(flaky_corpus, tmp_path):
    """The Ray stages as plain functions: the shard travels on as deferred, no file is written for it, and
    a rerun (the 503s over) records the good image as data and the corrupt one as an error; a write that
    meets a 503 is retried too."""
    from pipelines.data.ray_stream import _items_json, _prepare, _write

    items, paths = flaky_corpus
    cfg = PreprocessConfig(preset="tiny")
    FlakyMemoryFileSystem.failures[paths["good"]] = FAST_RETRIES.attempts
    prepared = _prepare({"shard": [7], "items": [_items_json(items)]}, cfg, FAST_RETRIES)
    assert "still failing after 3 attempts" in prepared["deferred"][0] and "SlowDown" in prepared["deferred"][0]
    written = _write(prepared, str(tmp_path))
    assert written["deferred"][0] and written["rows"] == [0] and written["errors"] == [0]
    assert completed_shards(str(tmp_path)) == {} and not list(tmp_path.rglob("*.parquet"))

    again = _prepare({"shard": [7], "items": [_items_json(items)]}, cfg, FAST_RETRIES)
    assert again["deferred"] == [""]
    errors = pa.ipc.open_stream(again["table"][0]).read_all().to_pylist()
    assert [r["source"] for r in errors if r["error"]] == ["corrupt.png"]
    # the writes meet a 503 too: a shard of the corrupt input alone (all error rows, so no encoder needed)
    # has its marker's first write fail; it is retried and the shard is done
    from pipelines.data.shards import encoded_schema, table_to_bytes

    only_bad = _prepare({"shard": [8], "items": [_items_json(items[:1])]}, cfg, FAST_RETRIES)
    rows = pa.ipc.open_stream(only_bad["table"][0]).read_all().drop_columns(["target_png", "reference_png"])
    only_bad["table"] = [table_to_bytes(pa.Table.from_pylist(rows.to_pylist(), schema=encoded_schema()))]
    output = paths["good"].rsplit("/", 1)[0] + "/dataset"
    marker = f"{output}/markers/shard-00008.json"  # an object store: written straight, no temporary file
    FlakyMemoryFileSystem.failures[marker] = 1
    done = _write(only_bad, f"flakymem://{output}", FAST_RETRIES)
    assert done["deferred"] == [""] and done["rows"] == [0] and done["errors"] == [1]
    assert FlakyMemoryFileSystem.opens[marker] == 2 and json.loads(done["marker"][0])["errors"] == 1
    assert list(completed_shards(f"flakymem://{output}")) == [8]


def test_temporary_failures_are_told_apart_from_bad_inputs():
    import errno

    import torch

    assert is_transient(OSError(errno.EBUSY, "SlowDown")) and is_transient(ConnectionResetError())
    assert is_transient(TimeoutError()) and is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    wrapped = RuntimeError("read failed")
    wrapped.__cause__ = ConnectionResetError("peer reset")
    assert is_transient(wrapped)
    for bad in (FileNotFoundError(errno.ENOENT, "gone"), ValueError("not an image"), PermissionError(errno.EACCES, "")):
        assert not is_transient(bad)
    calls = []
    with pytest.raises(ValueError):
        call_with_retries(lambda: calls.append(1) or int("x"), FAST_RETRIES, "parse")
    assert len(calls) == 1  # a bad input fails at once
    waits = []
    with pytest.raises(TransientFailure, match="encode: still failing after 3 attempts"):
        call_with_retries(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")),
                          RetryPolicy(attempts=3, base_seconds=1.0), "encode", sleep=waits.append)
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0  # backoff doubles


def test_an_encoder_out_of_memory_is_retried_from_the_prepared_values(workspace, config):
    """A CUDA out-of-memory raised by the CLIP tower (after the encoder has rewritten the reference mask in
    place) is retried and the shard comes out exactly as without it; when it never stops, the shard fails
    as temporary instead of turning its images into error rows."""
    import torch

    from pipelines.data.shards import prepare_shard

    items = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")][:1]
    prepared = prepare_shard(0, items, config)
    encoder = ShardEncoder(config, retry=FAST_RETRIES)
    clean = encoder.encode(prepared)
    clip = encoder.clip
    failures = {"left": 1}

    def clip_out_of_memory(images):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return clip(images)

    encoder.clip = clip_out_of_memory
    retried = encoder.encode(prepared)
    assert failures["left"] == 0 and retried.equals(clean)
    assert all(e is None for e in retried.column("error").to_pylist())
    failures["left"] = FAST_RETRIES.attempts
    with pytest.raises(TransientFailure, match="out of memory"):
        encoder.encode(prepared)


def test_the_default_shard_is_about_a_gigabyte_at_sdxl_and_the_flag_agrees(workspace, config):
    """Issue 18.11: 64 inputs per shard made 93,750 shards of 6M images. The estimate of a stored image is
    checked against a real tiny-preset shard's tensor columns, then used at the sdxl preset."""
    from jobs.preprocess import build_parser
    from model.geometry import buckets_for
    from pipelines.data.shards import DEFAULT_SHARD_SIZE, ENCODED_IMAGE_BYTES, prepare_shard, stored_bytes_per_image

    args = build_parser().parse_args(["--input", "x", "--out", "y", "--encoders", "z"])
    assert args.shard_size == PreprocessConfig().shard_size == DEFAULT_SHARD_SIZE
    per_image = stored_bytes_per_image("sdxl")
    assert 0.5e9 < DEFAULT_SHARD_SIZE * per_image < 1.5e9
    assert 5_000 < 6_000_000 / DEFAULT_SHARD_SIZE < 20_000

    items = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")]
    square = next(it for it in items if it.source.endswith("img_00000.png"))  # 256x256 → the 128x128 bucket
    row = ShardEncoder(config).encode(prepare_shard(0, [square], config)).to_pylist()[0]
    assert (row["width"], row["height"]) == (128, 128) == max(buckets_for(tiny()), key=lambda b: b[0] * b[1])
    tensors = sum(len(row[k]) for k in ("latents", "tagger_tokens", "clip_tokens"))
    assert tensors == stored_bytes_per_image("tiny") - ENCODED_IMAGE_BYTES


def test_prepared_shards_carry_lossless_png_not_raw_pixels_and_declare_their_memory(workspace, config):
    """Issue 18.3: raw RGB was 95% of a prepared shard. The PNG cells give back exactly the crop and the
    stretched source; the memory a prepare task declares grows with what it holds."""
    from model.geometry import crop_to_bucket, resize
    from model.image_io import decode_image
    from pipelines.data.ray_stream import prepare_memory_bytes, prepared_bytes_per_image
    from pipelines.data.shards import PIXEL_COLUMNS, prepare_shard
    from pipelines.data.tensor_cells import image_from_cell

    items = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")][:3]
    table = prepare_shard(0, items, config)
    assert not [c for c in table.column_names if "pixels" in c]
    for item, row in zip(items, table.to_pylist()):
        source = decode_image((workspace["corpus"] / item.source).read_bytes())
        bucket = (row["width"], row["height"])
        np.testing.assert_array_equal(image_from_cell(row["target_png"]), crop_to_bucket(source, bucket))
        np.testing.assert_array_equal(image_from_cell(row["reference_png"]), resize(source, *bucket))
        assert sum(len(row[c]) for c in PIXEL_COLUMNS) < 2 * 3 * row["width"] * row["height"]
    big = PreprocessConfig(preset="sdxl", shard_size=512)
    assert prepared_bytes_per_image("sdxl") < 0.7 * 6.5e6  # the raw-pixel shard held 6.5 MB per image
    assert prepare_memory_bytes(big) - prepare_memory_bytes(PreprocessConfig(preset="sdxl", shard_size=256)) == (
        2 * 256 * prepared_bytes_per_image("sdxl"))
    assert prepare_memory_bytes(big) < 6 * 2**30  # a 128 GiB node runs at most ~21 of them (180 before)


def test_a_shard_is_read_one_file_at_a_time_and_prepared_in_batches(workspace, config, flaky_corpus):
    """The prepare task never holds a shard's files all at once, nor its rows three times over: files are
    read as they are prepared, and the IPC bytes are written batch by batch with the same content."""
    from pipelines.data.corpus import iter_shard_bytes
    from pipelines.data.shards import PREPARE_BATCH_ROWS, bytes_to_table, prepare_shard, prepare_shard_bytes

    items, paths = flaky_corpus
    reads = iter_shard_bytes(items)
    next(reads)
    assert FlakyMemoryFileSystem.opens == {paths["corrupt"]: 1}  # the second file is not open yet
    corpus = [it for it in list_inputs(str(workspace["corpus"])).items if not it.source.startswith("broken/")]
    shard = (corpus * 2)[:PREPARE_BATCH_ROWS + 2]  # two batches
    streamed = bytes_to_table(prepare_shard_bytes(3, shard, config))
    assert streamed.equals(prepare_shard(3, shard, config)) and streamed.num_rows == len(shard)
    assert streamed.column("shard").to_pylist() == [3] * len(shard)
