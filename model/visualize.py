"""Pictures for experiment tracking: sample grids and Gram-matrix heat maps (the paper's Figs. 3 and 6).

A picture in MLflow is read weeks later by someone who did not write the logging code, so each one
explains itself: a sample grid names its columns in a header row, and a Gram figure names the layer and
the branch of every panel, marks the query token in red (as the paper does) and carries a color scale.

A Gram heat map shows, for one query token, its row of the cosine-token Gram matrix (:func:`model.gram.
gram_matrix`) reshaped to the feature map: how similar every token is to that point, i.e. the region the
network groups with it. Side by side for the aligned and the misaligned branch, it shows whether the
reference moved the sketch's segmentation (spatial entanglement).
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont

from model.gram import gram_matrix

HEADER_FONT_SIZE = 13
HEADER_PADDING = 4
QUERY_COLOR = "red"  # the paper highlights query tokens in red
GRAM_COLORMAP = "viridis"  # holds no red, so the query marker cannot be mistaken for a value
SIMILARITY_LABEL = "cosine similarity to the query token"
BRANCH_TITLES = {"aligned": "aligned branch (own reference)", "misaligned": "misaligned branch (rolled reference)"}


# ------------------------------------------------------------------------------------------ sample grids
def grid(rows: list[list[Image.Image]], cell: int = 128, titles: list[str] | None = None) -> Image.Image:
    """Rows of images → one picture, every image scaled to ``cell`` pixels high and placed in its column
    (as wide as the column's widest image). ``titles`` (one per column) add a header row naming them."""
    scaled = [[im.convert("RGB").resize((max(1, cell * im.size[0] // im.size[1]), cell)) for im in r] for r in rows]
    widths = column_widths(scaled)
    header = header_row(titles, widths) if titles is not None else None
    top = header.size[1] if header is not None else 0
    canvas = Image.new("RGB", (sum(widths), top + cell * len(scaled)), (255, 255, 255))
    if header is not None:
        canvas.paste(header, (0, 0))
    for y, r in enumerate(scaled):
        for x, im in zip(np.cumsum([0, *widths[:-1]]), r):
            canvas.paste(im, (int(x), top + y * cell))
    return canvas


def column_widths(rows: list[list[Image.Image]]) -> list[int]:
    columns = max(len(r) for r in rows)
    return [max((r[c].size[0] for r in rows if c < len(r)), default=1) for c in range(columns)]


def header_font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=HEADER_FONT_SIZE)


def wrap_title(title: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """Split ``title`` into lines that fit ``width`` pixels (a single long word may still overflow)."""
    for chars in range(max(1, len(title)), 0, -1):
        lines = textwrap.wrap(title, chars) or [""]
        if all(font.getlength(line) <= width - 2 * HEADER_PADDING for line in lines) or chars == 1:
            return lines
    return [title]


def header_row(titles: list[str], widths: list[int]) -> Image.Image:
    """White strip with each title centered over its column, wrapped to fit, and a rule beneath."""
    if len(titles) != len(widths):
        raise ValueError(f"{len(titles)} titles for {len(widths)} columns")
    font = header_font()
    wrapped = [wrap_title(t, w, font) for t, w in zip(titles, widths)]
    line_height = font.getbbox("Ag")[3] + 2
    height = max(len(lines) for lines in wrapped) * line_height + 2 * HEADER_PADDING + 1
    strip = Image.new("RGB", (sum(widths), height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    left = 0
    for lines, width in zip(wrapped, widths):
        for k, line in enumerate(lines):
            x = left + (width - font.getlength(line)) / 2
            draw.text((x, HEADER_PADDING + k * line_height), line, fill=(0, 0, 0), font=font)
        left += width
    draw.line([(0, height - 1), (strip.size[0], height - 1)], fill=(160, 160, 160))
    return strip


def sketch_image(sketch: torch.Tensor) -> Image.Image:
    """Inverted model sketch (1, H, W) in [-1, 1] → drawing (dark lines on white)."""
    drawing = ((1 - (sketch[0].float().clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(drawing)


# ------------------------------------------------------------------------------------- Gram heat maps
def query_token(height: int, width: int, query: tuple[float, float]) -> tuple[int, int]:
    """A query given as fractions (y, x) of the picture → the (row, column) of its token on an h×w map."""
    return min(height - 1, int(query[0] * height)), min(width - 1, int(query[1] * width))


def gram_query_row(features: torch.Tensor,
                   query: tuple[float, float] = (0.5, 0.5)) -> tuple[np.ndarray, tuple[int, int]]:
    """(C, h, w) features → the query token's row of the Gram matrix as an (h, w) map of cosine
    similarities in [-1, 1], and the token's (row, column)."""
    _, h, w = features.shape
    qy, qx = query_token(h, w, query)
    row = gram_matrix(features[None].float())[0, qy * w + qx].reshape(h, w)
    return row.cpu().numpy(), (qy, qx)


def layer_label(name: str) -> str:
    """Where a Gram layer sits, in words, with its module name (the paper's layers: the last transformer
    blocks of the encoder and the decoder at the lowest resolution)."""
    part = "encoder" if name.startswith("down_blocks") else "decoder" if name.startswith("up_blocks") else "middle"
    return f"{part} layer {name}"


def mark_query(axes, row: int, column: int, cell_height: float = 1.0, cell_width: float = 1.0) -> None:
    """Red box around the query token and a red point at its center (data coordinates, pixel centers at
    integers as ``imshow`` places them)."""
    axes.add_patch(Rectangle((column * cell_width - 0.5, row * cell_height - 0.5), cell_width, cell_height,
                             fill=False, edgecolor=QUERY_COLOR, linewidth=1.5))
    axes.plot([(column + 0.5) * cell_width - 0.5], [(row + 0.5) * cell_height - 0.5], "o", color=QUERY_COLOR,
              markersize=4)


def gram_figure(aligned: dict[str, torch.Tensor], misaligned: dict[str, torch.Tensor], *,
                query: tuple[float, float] = (0.5, 0.5), sketches: list[Image.Image] | None = None,
                timestep: int | None = None) -> Figure:
    """Gram heat maps of both branches: one figure row per (sample, layer) of the (B, C, h, w) features,
    columns [sketch,] aligned, misaligned; every panel titled, the query token marked, one color scale."""
    layers = sorted(aligned)
    if set(misaligned) != set(layers):
        raise ValueError(f"Gram layers differ between branches: {layers} vs {sorted(misaligned)}")
    samples = aligned[layers[0]].shape[0]
    columns = 2 + (sketches is not None)
    figure = Figure(figsize=(2.4 * columns + 1.0, 2.3 * samples * len(layers) + 0.5), dpi=100, layout="constrained")
    axes = figure.subplots(samples * len(layers), columns, squeeze=False)
    heat = None
    for i in range(samples):
        for j, layer in enumerate(layers):
            panels = list(axes[i * len(layers) + j])
            if sketches is not None:
                sketch_panel(panels.pop(0), sketches[i], aligned[layer].shape[-2:], query, f"sample {i}: sketch")
            for ax, branch, features in zip(panels, ("aligned", "misaligned"), (aligned, misaligned)):
                title = f"sample {i}\n{layer_label(layer)}\n{BRANCH_TITLES[branch]}"
                heat = heat_panel(ax, features[layer][i], query, title)
    heat_axes = [ax for row in axes for ax in row[-2:]]
    figure.colorbar(heat, ax=heat_axes, label=SIMILARITY_LABEL, shrink=0.9)
    when = f" at t = {timestep}" if timestep is not None else ""
    figure.suptitle(f"Gram matrix row of the query token (red){when}")
    return figure


def heat_panel(axes, features: torch.Tensor, query: tuple[float, float], title: str):
    """One heat map on ``axes``: the query token's Gram row on a fixed [-1, 1] scale, the token marked."""
    row, (qy, qx) = gram_query_row(features, query)
    image = axes.imshow(row, cmap=GRAM_COLORMAP, vmin=-1, vmax=1, interpolation="nearest")
    mark_query(axes, qy, qx)
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])
    return image


def sketch_panel(axes, sketch: Image.Image, feature_size: tuple[int, int], query: tuple[float, float],
                 title: str) -> None:
    """The sketch with the query token's area marked, so the heat maps can be read against the drawing."""
    h, w = feature_size
    qy, qx = query_token(h, w, query)
    axes.imshow(np.asarray(sketch.convert("RGB")), interpolation="nearest")
    mark_query(axes, qy, qx, cell_height=sketch.size[1] / h, cell_width=sketch.size[0] / w)
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])


def figure_image(figure: Figure) -> Image.Image:
    """Render a figure on the Agg canvas → RGB picture (what MLflow stores)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def figure_texts(figure: Figure) -> list[str]:
    """Every text the figure shows (titles, axis and color-bar labels, suptitle), for checks."""
    return [t.get_text() for t in figure.findobj(lambda artist: hasattr(artist, "get_text")) if t.get_text()]
