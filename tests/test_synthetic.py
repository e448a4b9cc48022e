"""The synthetic corpus is learnable: every role's regions take that role's palette color, every picture
shows every role, and palettes differ between pictures (so a reference's colors are information)."""

from __future__ import annotations

import numpy as np

from pipelines.data.synthetic import ROLES, synthetic_illustration


def test_regions_take_their_roles_palette_colors_and_palettes_differ():
    pictures = [synthetic_illustration(seed, width=192, height=160) for seed in range(8)]
    for picture in pictures:
        flat = picture.color.reshape(-1, 3)
        for role, color in enumerate(picture.palette):
            share = np.all(flat == color, axis=1).mean()
            assert share > 0.003, f"role {ROLES[role]} covers {share:.4f} of the picture"
        outline = picture.sketch < 128  # the drawing's lines are the picture's dark outlines
        assert outline.mean() > 0.01
        assert picture.color[outline].mean() < picture.color[~outline].mean() - 60
        assert not np.any(np.all(flat[outline.reshape(-1)][:, None] == picture.palette[None], axis=2).all(axis=1))
    palettes = np.stack([p.palette for p in pictures]).astype(int)
    assert np.abs(palettes[:, None] - palettes[None]).sum(axis=(2, 3))[~np.eye(8, dtype=bool)].min() > 60
    again = synthetic_illustration(3, width=192, height=160)
    assert np.array_equal(again.color, pictures[3].color) and np.array_equal(again.sketch, pictures[3].sketch)
