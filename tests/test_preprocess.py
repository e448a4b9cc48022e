"""The preprocess job's functions and its Ray Data run on a local Ray (2 CPUs), tiny preset."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

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
    assert tuple(latents.shape) == (4, row["height"] // 8, row["width"] // 8)
    tagger = bytes_to_tensor(row["tagger_tokens"], row["tagger_tokens_shape"])
    assert tuple(tagger.shape) == (cfg.tagger.num_tokens, cfg.tagger.token_dim)
    clip = bytes_to_tensor(row["clip_tokens"], row["clip_tokens_shape"])
    assert tuple(clip.shape) == (cfg.clip.num_tokens, cfg.clip.embed_dim)
    image = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert image.shape == (row["height"], row["width"], 3)
    for key in ("sketch_mask", "reference_mask"):
        mask = np.asarray(Image.open(io.BytesIO(row[key])))
        assert mask.shape == (row["height"], row["width"]) and set(np.unique(mask)) <= {0, 255}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_run_writes_every_shard_then_a_rerun_writes_nothing(workspace, config, local_ray, tmp_path):
    from pipelines.data.ray_stream import run_preprocess

    output = str(tmp_path / "dataset")
    manifest = run_preprocess(str(workspace["corpus"]), output, config)
    assert manifest["complete"] and manifest["inputs"] == 10 + workspace["bad"]
    assert manifest["rows"] == 10 and manifest["errors"] == workspace["bad"]
    assert sum(manifest["buckets"].values()) == 10
    assert manifest["bytes_per_image"]["latents"] > 0
    assert len(completed_shards(output)) == manifest["shards"] == 4
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
