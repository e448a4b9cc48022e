"""Tracking pictures explain themselves: grids name their columns, Gram figures name layer and branch,
mark the query token where it is and carry a color scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.visualize import (BRANCH_TITLES, SIMILARITY_LABEL, figure_image, figure_texts, gram_figure,
                             gram_query_row, grid, query_token)

LAYERS = ("down_blocks.2.attentions.1", "up_blocks.0.attentions.2")


def tiles(count: int, size=(64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * k, 200, 90)) for k in range(count)]


def two_region_features(height: int = 8, width: int = 8, split: int = 5) -> torch.Tensor:
    """(2, h, w) features: columns left of ``split`` point one way, the rest orthogonally."""
    features = torch.zeros(2, height, width)
    features[0, :, :split] = 1.0
    features[1, :, split:] = 1.0
    return features


def test_titles_add_a_header_row_above_the_same_grid():
    rows = [tiles(4), tiles(4)]
    plain = grid(rows, cell=64)
    titled = grid(rows, cell=64, titles=["sketch", "reference", "output", "truth"])
    header = titled.size[1] - plain.size[1]
    assert titled.size[0] == plain.size[0] and 12 <= header <= 64
    assert np.array_equal(np.asarray(titled)[header:], np.asarray(plain))  # the images move down, unchanged
    ink = np.asarray(titled.convert("L"))[:header - 1] < 128  # dark text on white, above the rule
    assert ink.sum() > 20
    column_width = plain.size[0] // 4
    assert all(ink[:, c * column_width:(c + 1) * column_width].any() for c in range(4))  # every column titled


def test_different_titles_draw_different_headers_and_long_ones_wrap():
    rows = [tiles(2)]
    short = grid(rows, cell=64, titles=["a", "b"])
    other = grid(rows, cell=64, titles=["sketch", "truth"])
    assert not np.array_equal(np.asarray(short), np.asarray(other))
    long = grid(rows, cell=64, titles=["the reference: the previous sample's truth", "b"])
    assert long.size[1] > short.size[1] and long.size[0] == short.size[0]
    with pytest.raises(ValueError, match="2 titles for 3 columns"):
        grid([tiles(3)], titles=["a", "b"])


def test_gram_row_is_the_query_tokens_cosine_similarity_map():
    row, (qy, qx) = gram_query_row(two_region_features(), query=(0.25, 0.75))
    assert (qy, qx) == (2, 6)
    assert row.shape == (8, 8)
    assert np.allclose(row[:, 5:], 1) and np.allclose(row[:, :5], 0)  # its own region, row-major reshaped
    assert query_token(4, 6, (0.99, 0.99)) == (3, 5) and query_token(4, 6, (1.0, 1.0)) == (3, 5)


def red_mask(picture: np.ndarray) -> np.ndarray:
    r, g, b = (picture[..., k].astype(int) for k in range(3))
    return (r > 200) & (g < 80) & (b < 80)


def test_the_query_marker_sits_on_the_query_token():
    features = {LAYERS[0]: two_region_features()[None]}
    query = (0.25, 0.75)
    figure = gram_figure(features, features, query=query)
    picture = np.asarray(figure_image(figure))
    heat_axes = [ax for ax in figure.axes if ax.images and ax.get_title()]
    assert len(heat_axes) == 2
    for ax in heat_axes:
        box = ax.get_window_extent()
        top, bottom = picture.shape[0] - int(box.y1), picture.shape[0] - int(box.y0)
        red = red_mask(picture[top:bottom, int(box.x0):int(box.x1)])
        assert red.sum() > 5
        ys, xs = np.nonzero(red)
        center_x, center_y = ax.transData.transform((6, 2))  # the token (row 2, column 6) in pixels
        assert abs(xs.mean() + int(box.x0) - center_x) < 3
        assert abs(ys.mean() + top - (picture.shape[0] - center_y)) < 3


def test_gram_figure_names_layers_and_branches_and_has_a_color_scale():
    features = {name: torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(k))
                for k, name in enumerate(LAYERS)}
    sketches = tiles(2, size=(48, 32))
    figure = gram_figure(features, features, sketches=sketches, timestep=500)
    texts = "\n".join(figure_texts(figure))
    for name in LAYERS:
        for branch in BRANCH_TITLES.values():
            assert sum(name in t and branch in t for t in figure_texts(figure)) == 2  # one per sample
    assert "encoder" in texts and "decoder" in texts and "t = 500" in texts
    colorbars = [ax for ax in figure.axes if ax.get_ylabel() == SIMILARITY_LABEL]
    assert len(colorbars) == 1 and colorbars[0].get_ylim() == (-1.0, 1.0)
    picture = figure_image(figure)
    assert picture.size[0] > 300 and picture.size[1] > 4 * 100  # 4 rows of panels (2 samples × 2 layers)


def test_branches_must_share_layers():
    with pytest.raises(ValueError, match="differ between branches"):
        gram_figure({LAYERS[0]: torch.randn(1, 4, 2, 2)}, {LAYERS[1]: torch.randn(1, 4, 2, 2)})
