"""The batch job's inputs: a manifest or a folder → pairs with their settings → the plan of units.

Two kinds of input, on any filesystem fsspec knows (local paths, ``file://``, ``s3://``, ``gs://``, ...):

* a manifest, CSV (header row) or Parquet, one row per pair: ``sketch`` and ``reference`` (required),
  ``background``, ``seed``, ``id`` (the pair's name: its output is ``images/<id>.png``; default the row
  number, 8 digits) and any per-row setting (:data:`SETTING_COLUMNS`: the fields of
  :class:`model.options.ColorizeOptions`, ``size`` as ``N`` or ``WxH``, ``guidance`` for both guidance
  scales, ``extract_lines`` and ``line_extractor``). Paths relative to the manifest's folder are resolved
  against it. An empty cell takes the job's default;
* a folder of sketches (recursive) with one reference (and optionally one background) for all; a pair's
  id is the sketch's path in the folder without its extension.

A setting that cannot be read (``steps=0``, ``size=65``) does not stop the job: the pair carries the reason
(``invalid``) and ends in the errors table. What makes the whole input unusable (an unknown column, two
pairs with one id) is a ``ValueError`` before anything runs.

Pairs are planned into *units* (the job's unit of work and of resumption): consecutive pairs in the order
(settings, reference, background, manifest row), at most ``unit_size`` each, never two settings in one
unit, so a unit's pairs share their options and mostly their reference.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass
from numbers import Integral, Real

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from model.line_art import CLASSIC_EXTRACTORS
from model.options import ColorizeOptions

OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(ColorizeOptions))
EXTRA_SETTINGS = ("extract_lines", "line_extractor")
SETTING_NAMES = OPTION_FIELDS + EXTRA_SETTINGS
ALIASES = ("guidance", "width", "height")  # guidance → both scales; width + height → size
PAIR_COLUMNS = ("id", "sketch", "reference", "background", "seed")
SETTING_COLUMNS = SETTING_NAMES + ALIASES
_INTS = ("steps",)
_FLOATS = ("reference_guidance", "sketch_guidance", "reference_strength", "aesthetic_score", "foreground_strength",
           "background_strength", "merge_scale", "sketch_mask_threshold", "reference_mask_threshold", "guidance")
_BOOLS = ("plugin", "background_enhance", "extract_lines")
_STRINGS = ("sampler", "line_extractor")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
MAX_SEED = 2**63 - 1
MAX_ID_CHARS = 200
_UNSAFE = re.compile(r"[^\w.\- ]")  # per path segment: word characters, dot, dash, space


@dataclass(frozen=True)
class Pair:
    """One pair to colorize. ``settings`` is the JSON of its settings (the job's defaults under the row's
    own), ``invalid`` the reason when they (or the seed) cannot be used; ``row`` its place in the input."""

    pair_id: str
    sketch: str
    reference: str
    background: str | None
    seed: int
    settings: str
    invalid: str | None
    row: int


# -------------------------------------------------------------------------------------------- settings
def _absent(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _to_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def _to_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, Real):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _to_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, Integral) and value in (0, 1):
        return bool(value)
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _to_size(value) -> list[int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [_to_int("size", v) for v in value]
    if isinstance(value, Integral) and not isinstance(value, bool):
        return [int(value), int(value)]
    parts = str(value).strip().lower().split("x")
    if len(parts) in (1, 2) and all(re.fullmatch(r"[0-9]+", p) for p in parts):
        return [int(parts[0]), int(parts[-1])]
    raise ValueError(f"size must be N or WxH, got {value!r}")


def _to_floats(name: str, value) -> list[float]:
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be numbers separated by commas, got {value!r}")
    return [_to_float(name, v) for v in value]


def parse_settings(raw: dict) -> dict:
    """Named setting values as given (strings from a CSV, typed values from Parquet or flags; absent ones
    left out) → normalized settings, checked as :class:`ColorizeOptions` checks them. Raises ``ValueError``
    with the reason."""
    raw = {k: v for k, v in raw.items() if not _absent(v)}
    unknown = sorted(set(raw) - set(SETTING_COLUMNS))
    if unknown:
        raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"the settings are {', '.join(SETTING_COLUMNS)}")
    out: dict = {}
    for name, value in raw.items():
        if name in _INTS:
            out[name] = _to_int(name, value)
        elif name in _FLOATS:
            out[name] = _to_float(name, value)
        elif name in _BOOLS:
            out[name] = _to_bool(name, value)
        elif name in _STRINGS:
            out[name] = str(value).strip()
        elif name == "size":
            out[name] = _to_size(value)
        elif name == "sketch_strengths":
            out[name] = _to_floats(name, value)
        elif name in ("width", "height"):
            out[name] = _to_int(name, value)
    guidance = out.pop("guidance", None)
    if guidance is not None:
        out.setdefault("reference_guidance", guidance)
        out.setdefault("sketch_guidance", guidance)
    width, height = out.pop("width", None), out.pop("height", None)
    if (width is None) != (height is None):
        raise ValueError("give both width and height, or neither")
    if width is not None:
        out.setdefault("size", [width, height])
    if "line_extractor" in out and out["line_extractor"] not in CLASSIC_EXTRACTORS:
        raise ValueError(f"line_extractor must be one of {', '.join(CLASSIC_EXTRACTORS)}, got {out['line_extractor']!r}")
    settings_options(out)  # ColorizeOptions' own checks (ranges, sampler names, ...)
    return out


def merge_settings(defaults: dict, own: dict) -> dict:
    """A row's settings over the job's defaults (both already parsed)."""
    return {**defaults, **own}


def settings_options(settings: dict) -> ColorizeOptions:
    """The :class:`ColorizeOptions` of parsed settings (the line settings aside)."""
    return ColorizeOptions(**{k: v for k, v in settings.items() if k in OPTION_FIELDS})


def line_extractor_of(settings: dict) -> str | None:
    """The extractor a pair's sketch goes through first, or None (the sketch is used as it is)."""
    return settings.get("line_extractor", "xdog") if settings.get("extract_lines") else None


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def parse_seed(value, default: int) -> int:
    if _absent(value):
        return default
    seed = _to_int("seed", value)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is outside [0, {MAX_SEED}]")
    return seed


# ---------------------------------------------------------------------------------------------- inputs
def protocol_path(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _resolve(base_fs, base_dir: str, value: str) -> str:
    value = value.strip()
    if "://" in value or value.startswith("/"):
        return value
    return protocol_path(base_fs, posixpath.normpath(posixpath.join(base_dir, value)))


def safe_id(text: str) -> str:
    """A pair id usable as a relative path under ``images/``: each segment keeps word characters, dots,
    dashes and spaces (anything else becomes ``_``), never starts with a dot, never is empty."""
    segments = [s for s in str(text).replace("\\", "/").split("/") if s.strip()]
    cleaned = []
    for segment in segments:
        segment = _UNSAFE.sub("_", segment.strip())
        cleaned.append("_" + segment if segment.startswith(".") else segment)
    result = "/".join(cleaned)
    if not result:
        raise ValueError(f"pair id {text!r} is empty")
    if len(result) > MAX_ID_CHARS:
        raise ValueError(f"pair id {text[:40]!r}... is longer than {MAX_ID_CHARS} characters")
    return result


def read_manifest_rows(uri: str) -> list[dict]:
    """The manifest's rows (CSV: every value a string; Parquet: as stored)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {uri}")
    if fs.isdir(path) or path.lower().endswith((".parquet", ".pq")):
        files = sorted(f for f in fs.find(path) if f.lower().endswith((".parquet", ".pq"))) if fs.isdir(path) \
            else [path]
        if not files:
            raise ValueError(f"no .parquet files under {uri}")
        tables = []
        for name in files:
            with fs.open(name, "rb") as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables, promote_options="default").to_pylist()
    if not path.lower().endswith((".csv", ".tsv")):
        raise ValueError(f"manifest {uri} must be a .csv, .tsv or .parquet file (or a folder of .parquet files)")
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.lower().endswith(".tsv") else ",")
    if reader.fieldnames is None:
        raise ValueError(f"manifest {uri} is empty")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    return [dict(row) for row in reader]


def pairs_from_manifest(uri: str, defaults: dict, seed: int) -> list[Pair]:
    rows = read_manifest_rows(uri)
    if not rows:
        raise ValueError(f"manifest {uri} has no rows")
    columns = list(rows[0])
    missing = [c for c in ("sketch", "reference") if c not in columns]
    if missing:
        raise ValueError(f"manifest {uri} has no {' and no '.join(missing)} column; columns are {columns}")
    unknown = [c for c in columns if c not in PAIR_COLUMNS + SETTING_COLUMNS]
    if unknown:
        raise ValueError(f"manifest {uri} has unknown column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"the columns are {', '.join(PAIR_COLUMNS + SETTING_COLUMNS)}")
    fs, path = fsspec.core.url_to_fs(uri)
    base = posixpath.dirname(path)
    pairs = []
    for i, row in enumerate(rows):
        own_id = row.get("id")
        pair_id = safe_id(own_id) if not _absent(own_id) else f"{i:08d}"
        sketch, reference = row.get("sketch"), row.get("reference")
        invalid = None
        if _absent(sketch) or _absent(reference):
            invalid = "the row has no " + " and no ".join(n for n, v in (("sketch", sketch), ("reference", reference))
                                                         if _absent(v))
        background = None if _absent(row.get("background")) else _resolve(fs, base, str(row["background"]))
        try:
            pair_seed = parse_seed(row.get("seed"), seed)
        except ValueError as err:
            pair_seed, invalid = seed, invalid or str(err)
        try:
            settings = merge_settings(defaults, parse_settings({k: row[k] for k in SETTING_COLUMNS if k in row}))
            settings_options(settings)
        except ValueError as err:
            settings, invalid = dict(defaults), invalid or str(err)
        pairs.append(Pair(pair_id=pair_id,
                          sketch="" if _absent(sketch) else _resolve(fs, base, str(sketch)),
                          reference="" if _absent(reference) else _resolve(fs, base, str(reference)),
                          background=background, seed=pair_seed, settings=settings_json(settings),
                          invalid=invalid, row=i))
    _require_unique(pairs, uri)
    return pairs


def pairs_from_folder(sketches: str, reference: str, background: str | None, defaults: dict,
                      seed: int) -> list[Pair]:
    from pipelines.data.corpus import list_inputs

    listing = list_inputs(sketches, kind="folder")
    skip = {reference, background}
    items = [it for it in listing.items if it.path not in skip]
    if not items:
        raise ValueError(f"no sketches (image files) under {sketches}")
    stems = [safe_id(posixpath.splitext(it.source)[0]) for it in items]
    taken = {s: stems.count(s) for s in stems}
    ids = [stem if taken[stem] == 1 else safe_id(it.source) for stem, it in zip(stems, items)]
    text = settings_json(defaults)
    pairs = [Pair(pair_id=pair_id, sketch=it.path, reference=reference, background=background, seed=seed,
                  settings=text, invalid=None, row=i) for i, (pair_id, it) in enumerate(zip(ids, items))]
    _require_unique(pairs, sketches)
    return pairs


def _require_unique(pairs: list[Pair], where: str) -> None:
    seen: dict[str, int] = {}
    for pair in pairs:
        if pair.pair_id in seen:
            raise ValueError(f"{where}: rows {seen[pair.pair_id]} and {pair.row} have the same id {pair.pair_id!r} "
                             "(ids name the outputs, images/<id>.png: they must be unique)")
        seen[pair.pair_id] = pair.row
    lowered = {}
    for pair in pairs:  # one file per id on case-insensitive filesystems too
        other = lowered.setdefault(pair.pair_id.lower(), pair.pair_id)
        if other != pair.pair_id:
            raise ValueError(f"{where}: ids {other!r} and {pair.pair_id!r} differ only in case")


# ------------------------------------------------------------------------------------------------ plan
def plan_units(pairs: list[Pair], unit_size: int) -> list[list[Pair]]:
    """Pairs in (settings, reference, background, row) order, cut into units of at most ``unit_size``,
    a new unit wherever the settings change."""
    if unit_size < 1:
        raise ValueError(f"unit size must be at least 1, got {unit_size}")
    ordered = sorted(pairs, key=lambda p: (p.settings, p.reference, p.background or "", p.row))
    units: list[list[Pair]] = []
    for pair in ordered:
        current = units[-1] if units else None
        if current is None or len(current) >= unit_size or current[0].settings != pair.settings:
            units.append([pair])
        else:
            current.append(pair)
    return units


PLAN_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("ordinal", pa.int32()), ("pair_id", pa.string()), ("row", pa.int64()),
    ("sketch", pa.string()), ("reference", pa.string()), ("background", pa.string()), ("seed", pa.int64()),
    ("settings", pa.string()), ("invalid", pa.string()),
])


def plan_table(units: list[list[Pair]]) -> pa.Table:
    rows = [{"unit": k, "ordinal": i, **dataclasses.asdict(pair)}
            for k, unit in enumerate(units) for i, pair in enumerate(unit)]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def units_from_plan(table: pa.Table) -> list[list[Pair]]:
    units: dict[int, list[Pair]] = {}
    names = [f.name for f in dataclasses.fields(Pair)]
    for row in table.sort_by([("unit", "ascending"), ("ordinal", "ascending")]).to_pylist():
        units.setdefault(row["unit"], []).append(Pair(**{n: row[n] for n in names}))
    return [units[k] for k in sorted(units)]


def pair_to_json(pair: Pair) -> dict:
    return dataclasses.asdict(pair)


def pair_from_json(data: dict) -> Pair:
    return Pair(**data)
