"""One-shot localisation: find the anatomy at given points of one scan (the template) in another
(the target) with an ISImed encoder, whose embedding distances are physical distances / scale.

  loc = locate.load_locator(workdir)                       # the checkpoint's encoder and settings
  a = locate.embed_volume(loc, *locate.read_volume(path_a, loc))
  b = locate.embed_volume(loc, *locate.read_volume(path_b, loc))
  found, score = locate.match(points_mm, a, b, loc)         # (P, ndim) target mm, (P,) mm

Both scans are read with `isimed.data.readers` (world mm, RAS) and normalised as the pretraining
data was (`isimed.data.prepare.process_volume` with the settings of the prepared folder the
checkpoint trained on, from its prepared.json; overridable where that folder is gone). Foreground
cropping is left out: it changes no intensity, only which crops exist, and the foreground test
on every crop already drops the ones pretraining never sampled.

Pose (`align`, the command does it by default): rotated crops embed near their unrotated
position, so a target in another pose is first resampled into the template's: a rigid pose is
fitted to hundreds of coarse matches, the target resampled through it and embedded again,
a few rounds (each takes off part of the remaining rotation).

Matching, coarse to fine:
1. Each volume is embedded once as a regular grid of crops (`stride` voxels apart, crops with
   less than the config's foreground share dropped, as pretraining never saw them).
2. Each point is described by the template crop centred on it plus, with `offset_mm > 0`, the
   2 * ndim crops `offset_mm` away along each world axis. A candidate target position costs the
   mean embedding distance between these query crops and the target crops at the same offsets
   around it: one crop can be ambiguous (the left and right hemispheres look alike), a
   constellation of crops much less. Offsets are realised as whole template voxels (and, on the
   coarse grid, whole grid cells), so every query crop is a crop the grid can hold; an offset
   crop that would leave the template is dropped for that point rather than moved. On the
   coarse grid every candidate is scored at once (the cost map, `cost_maps`), the best one wins.
3. Local search at one-voxel steps: the 3^ndim neighbours of the current best start are embedded
   and scored the same way, moving until the centre is best (at most `max_moves` times).

The result is the found crop centre plus the point's sub-voxel offset from its template crop
centre. The score is the final mean embedding distance times the loss scale: an estimate, in mm,
of how far the found anatomy is from the point's (0 for an identical neighbourhood). Offsets are
world-axis vectors, so a rotation between the scans by angle a shifts an offset crop by about
offset_mm * a (2.1 mm for 12 mm at 10 degrees): small next to a crop.

Embedded grids can be cached in npz files (`embed_volume(..., cache=PATH)`, `cache_path` names
one from the file, its size and time, the checkpoint and every setting); never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from isimed import geometry
from isimed.data import pipeline
from isimed.data import prepare
from isimed.data import readers
from isimed.evaluation import grid

EmbedFn = Callable[[np.ndarray], np.ndarray]
# Bump when the cached arrays or their meaning change: old caches are then ignored, not misread.
CACHE_VERSION = 1
NORMALISATION_KEYS = ("intensity", "window", "spacing")


class LocateError(ValueError):
    """Bad input to localisation; the message is one line naming the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Locator:
    """An encoder and what matching needs to know about it.

    embed: crops `(n, *crop_shape, 1)` float32 in [-1, 1] -> embeddings `(n, D)`.
    scale: mm per embedding unit (ISImed's `loss.scale`).
    normalisation: how scans are normalised and resampled (`process_volume`'s intensity, window,
      spacing), as the pretraining data was.
    window: the pipeline's crop window (None: data normalised when prepared, as here).
    name: identifies the encoder in cache keys (workdir and checkpoint step).
    """

    embed: EmbedFn
    crop_shape: tuple[int, ...]
    scale: float
    normalisation: Mapping[str, Any]
    min_foreground: float = 0.5
    foreground_threshold: float = -0.9
    window: Sequence[float] | None = None
    chunk: int = 256
    name: str = "encoder"


@dataclasses.dataclass
class Grid:
    """One embedded volume: the normalised image, its affine, and embeddings of crops on a regular
    lattice (`lattice[i, j, k]`: the row of the crop starting at `origin + stride * (i, j, k)`, -1
    where the crop was dropped). `extra` keeps crops embedded later (fine search), keyed by start."""

    image: np.ndarray
    affine: np.ndarray
    stride: int
    origin: np.ndarray
    lattice: np.ndarray
    starts: np.ndarray
    embeddings: np.ndarray
    source: str = "image"
    extra: dict[tuple[int, ...], np.ndarray] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Encoder and volumes.


def load_locator(
    workdir: str, step: int | None = None, *, normalisation: Mapping[str, Any] | None = None
) -> Locator:
    """The encoder of a pretraining workdir (latest readable step by default) with its stored
    config's crop, scale and foreground settings. `normalisation` overrides the keys of
    NORMALISATION_KEYS that the prepared folder's prepared.json would give; all three are needed
    when that folder is not at hand. LocateError for a workdir without checkpoints."""
    from isimed import checkpoints
    from isimed import runtime
    from isimed.evaluation import features

    try:
        config, networks, state = checkpoints.load_encoder(workdir, step)
    except FileNotFoundError as e:
        raise LocateError(f"{workdir}: no pretraining checkpoint ({e})") from None
    embed = features.make_embed_fn(networks, runtime.make_mesh())(
        state["params"]["encoder"], state["batch_stats"]
    )
    return Locator(
        embed=embed,
        crop_shape=tuple(int(c) for c in config.data.crop_size),
        scale=_scale(config, state),
        normalisation=stored_normalisation(config, normalisation),
        min_foreground=float(config.data.min_foreground),
        foreground_threshold=float(config.data.foreground_threshold),
        window=config.data.get("window"),
        name=f"{os.path.abspath(workdir)}@{int(state['step'])}",
    )


def _scale(config, state) -> float:
    """The mm one unit of embedding distance stands for (`Method.target_scale_mm`)."""
    from isimed import methods

    scale = methods.get(config.method).target_scale_mm(state["params"], config.loss)
    if scale is None:
        raise LocateError(
            f"method {config.method!r} has no distance target: localisation needs an ISImed encoder"
        )
    return scale


def stored_normalisation(config, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """intensity, window, spacing of the prepared folder `config.data.dir` (its prepared.json),
    with `overrides` (None values ignored) applied. Data windowed in the pipeline (a config with
    `data.window`: raw CT in HU, e.g. the phantom) is read raw: intensity None. LocateError
    saying which flags to pass when the prepared folder cannot be read."""
    from isimed.data import prepared

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(NORMALISATION_KEYS)
    if unknown:
        raise ValueError(f"unknown normalisation keys {sorted(unknown)}; known: {NORMALISATION_KEYS}")
    settings: dict[str, Any] = {}
    if config.data.get("window") is None and not _complete(overrides):
        directory = config.data.get("dir")
        reason = "the checkpoint's config names no prepared folder"
        try:
            settings = prepared.load_manifest(directory)["settings"] if directory else {}
        except (OSError, ValueError) as e:
            reason = _one_line(e)
        if not settings:
            raise LocateError(
                f"cannot read how the pretraining data was normalised ({reason}); pass "
                "--intensity=ct|mri|uint8, --window=LO,HI (ct) and --spacing=MM (0: each scan's own grid)"
            )
    out = {key: settings.get(key) for key in NORMALISATION_KEYS}
    out.update(overrides)
    if out["intensity"] != "ct":
        out["window"] = None
    if not out["spacing"]:
        out["spacing"] = None
    return out


def _complete(overrides: Mapping[str, Any]) -> bool:
    """Whether overrides say everything: intensity, spacing and (CT) the window."""
    needed = {"intensity", "spacing"} | ({"window"} if overrides.get("intensity") == "ct" else set())
    return needed <= set(overrides)


def read_volume(path: str, locator: Locator) -> tuple[np.ndarray, np.ndarray, str]:
    """`(image, affine, source)` of a NIfTI / NRRD file or DICOM folder, normalised to [-1, 1]
    (float16) and resampled as `locator.normalisation` says; LocateError naming the file."""
    ndim = len(locator.crop_shape)
    norm = locator.normalisation
    try:
        image, affine = readers.read_image(path, ndim=ndim)
    except (OSError, ValueError) as e:
        message = _one_line(e if str(path) in str(e) else f"{path}: {e}")
        if "expected a" in message:  # The readers' hint is for prepare; say what matching needs.
            message = (
                message.split("; ")[0] + f" (the encoder takes {ndim}D crops: both scans must be {ndim}D)"
            )
        raise LocateError(message) from None
    if norm["intensity"] is None:  # Windowed per crop, as the pipeline does with raw data.
        return np.asarray(image, np.float32), np.asarray(affine, np.float64), str(path)
    try:
        out = prepare.process_volume(
            image,
            affine,
            None,
            intensity=norm["intensity"],
            window=norm["window"] or (-1000.0, 1000.0),
            spacing=norm["spacing"] or None,
            where=str(path),
        )
    except ValueError as e:
        raise LocateError(_one_line(e)) from None
    image = out["image"]
    if any(s < c for s, c in zip(image.shape, locator.crop_shape)):
        raise LocateError(
            f"{path}: image {image.shape} (after resampling) is smaller than a crop {locator.crop_shape}"
        )
    return image, out["affine"], str(path)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())


def cache_path(folder: str, path: str, locator: Locator, stride: int) -> str:
    """An npz name in `folder` for the embedded grid of `path`: keyed by the file (absolute path,
    size, modification time), the encoder (`locator.name`), the crop, stride and normalisation."""
    stat = os.stat(path)
    key = json.dumps(
        [
            CACHE_VERSION,
            os.path.abspath(path),
            stat.st_size,
            stat.st_mtime_ns,
            locator.name,
            locator.crop_shape,
            stride,
            dict(locator.normalisation),
            locator.min_foreground,
            locator.foreground_threshold,
        ],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(path)).split(".")[0] or "volume"
    return os.path.join(folder, f"{name}.{digest}.npz")


# ------------------------------------------------------------------------------------------------
# Embedding.


def embed_crops(
    locator: Locator, image: np.ndarray, starts: np.ndarray, desc: str | None = None
) -> np.ndarray:
    """Embeddings `(n, D)` of the crops of `image` at `starts`, `locator.chunk` crops at a time
    (crops are cut per chunk, so memory stays at one chunk of crops), with a progress bar if
    `desc` (on a terminal)."""
    starts = np.asarray(starts, np.int64).reshape(-1, image.ndim)
    out = []
    chunks = range(0, len(starts), locator.chunk)
    bar = tqdm.tqdm(total=len(starts), desc=desc, unit="crop", leave=False, disable=None if desc else True)
    with bar:
        for i in chunks:
            part = starts[i : i + locator.chunk]
            crops = pipeline.crop_values(pipeline.cut_crops(image, part, locator.crop_shape), locator.window)
            out.append(np.asarray(locator.embed(crops[..., None]), np.float32))
            bar.update(len(part))
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out)


def embed_volume(
    locator: Locator,
    image: np.ndarray,
    affine: np.ndarray,
    source: str = "image",
    *,
    stride: int = 3,
    cache: str | None = None,
    progress: bool = False,
) -> Grid:
    """Embeds the grid crops of a normalised volume (`read_volume`); with `cache`, reads the
    embeddings from that npz if it exists and writes them there otherwise."""
    crop = locator.crop_shape
    geometry.check_crop_fits(image.shape, crop, source)
    all_starts = grid.grid_starts(image.shape, crop, stride)
    origin = all_starts[0]
    lattice_shape = tuple(int(v) for v in (all_starts[-1] - origin) // stride + 1)
    if cache and os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as f:
            starts, embeddings = f["starts"], f["embeddings"]
    else:
        fraction = geometry.box_fractions(pipeline.above(image, locator.foreground_threshold), crop)
        keep = fraction[tuple(all_starts.T)] >= locator.min_foreground - 1e-9
        starts = all_starts[keep]
        desc = f"embed {os.path.basename(source)}" if progress else None
        embeddings = embed_crops(locator, image, starts, desc)
        if cache:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            tmp = cache + ".tmp.npz"
            np.savez(tmp, starts=starts, embeddings=embeddings)
            os.replace(tmp, cache)
    if not len(starts):
        raise LocateError(
            f"{source}: no crop of {crop} holds >= {locator.min_foreground:.0%} foreground "
            f"(voxels above {locator.foreground_threshold:g} after normalisation)"
        )
    lattice = np.full(lattice_shape, -1, np.int64)
    lattice[tuple(((starts - origin) // stride).T)] = np.arange(len(starts))
    return Grid(image, np.asarray(affine, np.float64), stride, origin, lattice, starts, embeddings, source)


# ------------------------------------------------------------------------------------------------
# Matching.


def _offsets(offset_mm: float, ndim: int) -> np.ndarray:
    """World offsets `(K, ndim)` of a point's query crops: its own, then +-offset_mm along each axis."""
    offsets = np.zeros((1, ndim))
    if offset_mm > 0:
        offsets = np.concatenate([offsets, offset_mm * np.eye(ndim), -offset_mm * np.eye(ndim)])
    return offsets


@dataclasses.dataclass(frozen=True)
class _Queries:
    """Each point's query crops in the template. Every crop sits a whole number of template voxels
    from the point's centre crop (`voxels`, the same for every point), so the constellation is
    the same wherever the point lies; `offsets` is that constellation in world mm, which the
    target reproduces in its own voxels. A crop that would leave the template is left out
    (`valid`) rather than moved inside, which would change the constellation near an edge."""

    starts: np.ndarray  # (P, K, ndim) template crop starts (the centre crop's where not valid)
    valid: np.ndarray  # (P, K)
    offsets: np.ndarray  # (K, ndim) world mm from the centre crop's centre
    residual: np.ndarray  # (P, ndim) mm from the centre crop's centre to the point


def _queries(
    points_mm: np.ndarray, template: Grid, crop: tuple[int, ...], offsets_mm: np.ndarray
) -> _Queries:
    """The query crops of template points `(P, ndim)` world mm for world offsets `(K, ndim)`.
    LocateError for a point outside the template. Near an edge the centre crop is moved inside
    the image; `residual` carries its shift."""
    ndim = len(crop)
    shape = np.asarray(template.image.shape)
    index = geometry.world_to_voxel(points_mm, template.affine)
    outside = np.flatnonzero(np.any((index < -0.5) | (index > shape - 0.5), axis=1))
    if outside.size:
        i = int(outside[0])
        raise LocateError(
            f"{template.source}: point {i + 1} ({', '.join(f'{v:g}' for v in points_mm[i])} mm) is "
            f"outside the template ({len(outside)} of {len(points_mm)} points are; world extent "
            f"{_extent(template)})"
        )
    limit = shape - np.asarray(crop)
    centre = np.clip(np.round(index - (np.asarray(crop) - 1) / 2), 0, limit).astype(np.int64)
    linear = template.affine[:ndim, :ndim]
    voxels = np.round(np.linalg.solve(linear, np.asarray(offsets_mm, np.float64).T).T).astype(np.int64)
    starts = centre[:, None, :] + voxels[None]
    valid = np.all((starts >= 0) & (starts <= limit), axis=-1)
    starts = np.where(valid[..., None], starts, centre[:, None, :])
    residual = np.asarray(points_mm) - geometry.crop_centres_mm(centre, crop, template.affine)
    return _Queries(starts, valid, voxels @ linear.T, residual)


def _extent(g: Grid) -> str:
    corners = geometry.voxel_to_world(
        np.array([np.zeros(g.image.ndim), np.asarray(g.image.shape) - 1.0]), g.affine
    )
    lo, hi = corners.min(0), corners.max(0)
    return " x ".join(f"[{a:.1f}, {b:.1f}]" for a, b in zip(lo, hi))


def _target_offsets(offsets: np.ndarray, target: Grid) -> np.ndarray:
    """World offsets `(K, ndim)` as whole target voxels `(K, ndim)`."""
    linear = target.affine[:-1, :-1]
    return np.round(np.linalg.solve(linear, offsets.T).T).astype(np.int64)


def _lattice_offsets(offsets_mm: np.ndarray, target: Grid) -> np.ndarray:
    """The coarse step's offsets: `offsets_mm` moved to whole cells of the target's lattice, at
    least one cell where the offset is not zero (on thick slices a 12 mm offset would round to
    none and compare a crop with itself). Returns world offsets `(K, ndim)`."""
    linear = target.affine[:-1, :-1]
    cells = np.linalg.solve(linear, offsets_mm.T).T / target.stride
    steps = np.round(cells)
    for k in np.flatnonzero(~np.any(steps, axis=1) & np.any(offsets_mm, axis=1)):
        a = int(np.argmax(np.abs(cells[k])))
        steps[k, a] = np.sign(cells[k, a])
    return (steps * target.stride) @ linear.T


def _embed_queries(locator: Locator, template: Grid, q: _Queries) -> np.ndarray:
    p, k, ndim = q.starts.shape
    return embed_crops(locator, template.image, q.starts.reshape(-1, ndim)).reshape(p, k, -1)


def cost_maps(
    points_mm: np.ndarray,
    template: Grid,
    target: Grid,
    locator: Locator,
    *,
    offset_mm: float = 12.0,
    chunk: int = 64,
) -> np.ndarray:
    """Coarse step: costs `(P, *lattice)` in mm. costs[p] at a lattice cell is the mean distance,
    times the scale, between point p's query crops and the target's crops at the same offsets
    around that cell's crop, the offsets moved to whole lattice cells (`_lattice_offsets`; the
    template's query crops are placed at those offsets too); inf where the centre crop was
    dropped or fewer than half of the point's query crops have a target crop to compare with."""
    points_mm = np.atleast_2d(np.asarray(points_mm, np.float64))
    crop = locator.crop_shape
    ndim = len(crop)
    coarse = _lattice_offsets(_offsets(offset_mm, ndim), target)
    q = _queries(points_mm, template, crop, coarse)
    queries = _embed_queries(locator, template, q)
    steps = np.round(_target_offsets(q.offsets, target) / target.stride).astype(np.int64)
    shape = np.asarray(target.lattice.shape)
    cells = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, ndim)
    shifted = []
    for step in steps:
        moved = cells + step
        ok = np.all((moved >= 0) & (moved < shape), axis=1)
        rows = np.full(len(cells), -1, np.int64)
        rows[ok] = target.lattice[tuple(moved[ok].T)]
        shifted.append(rows)
    shifted = np.stack(shifted)  # (K, cells): row of the target crop at each offset, -1: none.
    emb = target.embeddings
    costs = np.empty((len(points_mm), len(cells)), np.float32)
    for a in range(0, len(points_mm), chunk):
        qv = q.valid[a : a + chunk]  # (c, K)
        total = np.zeros((len(qv), len(cells)), np.float64)
        count = np.zeros((len(qv), len(cells)), np.int64)
        for j in range(len(steps)):
            both = qv[:, j, None] & (shifted[j] >= 0)[None]  # (c, cells)
            d = _distances(queries[a : a + chunk, j], emb)[:, np.maximum(shifted[j], 0)]
            total += np.where(both, d, 0.0)
            count += both
        enough = (shifted[0] >= 0)[None] & (count >= (qv.sum(1, keepdims=True) + 1) // 2)
        costs[a : a + chunk] = np.where(enough, total / np.maximum(count, 1) * locator.scale, np.inf)
    return costs.reshape(len(points_mm), *shape)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances `(n, m)` between rows of a and b (float64, clipped at 0 before sqrt)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def match(
    points_mm: np.ndarray,
    template: Grid,
    target: Grid,
    locator: Locator,
    *,
    offset_mm: float = 12.0,
    refine: bool = True,
    max_moves: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """`(found (P, ndim) target world mm, score (P,) mm)` for template points `(P, ndim)` world mm.

    `offset_mm=0`: plain nearest neighbour of the point's own crop. `refine=False`: the coarse
    grid's answer only. The score estimates the error in mm (see the module docstring); inf where
    no target crop could be compared (a target without foreground around the answer)."""
    points_mm = np.atleast_2d(np.asarray(points_mm, np.float64))
    crop = locator.crop_shape
    ndim = len(crop)
    if points_mm.shape[1:] != (ndim,):
        raise LocateError(f"points must be (P, {ndim}) world mm, got shape {points_mm.shape}")
    if template.image.ndim != target.image.ndim:
        raise LocateError(
            f"{template.source} is {template.image.ndim}D but {target.source} is {target.image.ndim}D"
        )
    if not len(points_mm):
        return np.zeros((0, ndim)), np.zeros(0)
    costs = cost_maps(points_mm, template, target, locator, offset_mm=offset_mm)
    flat = costs.reshape(len(points_mm), -1)
    best = np.argmin(flat, axis=1)
    score = flat[np.arange(len(best)), best]
    cells = np.stack(np.unravel_index(best, target.lattice.shape), -1)
    starts = target.origin + target.stride * cells
    q = _queries(points_mm, template, crop, _offsets(offset_mm, ndim))
    if refine:
        starts, score = _refine(
            starts, score, q, _embed_queries(locator, template, q), target, locator, max_moves
        )
    found = geometry.crop_centres_mm(starts, crop, target.affine) + q.residual
    return found, np.asarray(score, np.float64)


def _refine(starts, score, q: _Queries, queries: np.ndarray, target: Grid, locator: Locator, max_moves: int):
    """Local search at one-voxel steps from each coarse start (see the module docstring)."""
    crop = np.asarray(locator.crop_shape)
    ndim = len(crop)
    voxel_offsets = _target_offsets(q.offsets, target)
    cube = np.stack(np.meshgrid(*([np.arange(-1, 2)] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    limit = np.asarray(target.image.shape) - crop
    starts = starts.copy()
    score = np.asarray(score, np.float64).copy()
    active = np.isfinite(score)
    # The coarse score used lattice offsets: the first fine step replaces it whatever it is.
    coarse = score.copy()
    score[active] = np.inf
    for _ in range(max_moves + 1):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        # (a, 3^ndim, K, ndim): every crop each active point's candidates need.
        needed = starts[idx, None, None, :] + cube[None, :, None, :] + voxel_offsets[None, None]
        inside = np.all((needed >= 0) & (needed <= limit), axis=-1)
        use = inside & q.valid[idx, None, :]
        _embed_missing(needed[use], target, locator)
        emb = np.zeros((*needed.shape[:-1], queries.shape[-1]), np.float32)
        for pos in zip(*np.nonzero(use)):
            emb[pos] = target.extra[tuple(needed[pos])]
        d = np.linalg.norm(emb - queries[idx, None], axis=-1)  # (a, cube, K)
        count = use.sum(-1)
        mean = np.where(count > 0, (d * use).sum(-1) / np.maximum(count, 1), np.inf)
        mean[~inside[..., 0]] = np.inf  # The centre crop itself must exist.
        choice = np.argmin(mean, axis=1)
        new = mean[np.arange(len(idx)), choice] * locator.scale
        moved = choice != len(cube) // 2
        better = np.isfinite(new) & (new <= score[idx] + 1e-9)
        starts[idx] = np.where((better & moved)[:, None], starts[idx] + cube[choice], starts[idx])
        score[idx] = np.where(better, new, score[idx])
        active[idx] = better & moved
    return starts, np.where(np.isfinite(score), score, coarse)


def _embed_missing(needed: np.ndarray, target: Grid, locator: Locator) -> None:
    """Puts the embeddings of the crops at `needed` starts into `target.extra`: from the grid where
    it has them, else embedded now."""
    unique = np.unique(needed.reshape(-1, needed.shape[-1]), axis=0)
    missing = []
    for s in unique:
        key = tuple(int(v) for v in s)
        if key in target.extra:
            continue
        cell, rest = np.divmod(s - target.origin, target.stride)
        if not rest.any() and np.all((cell >= 0) & (cell < target.lattice.shape)):
            row = target.lattice[tuple(cell)]
            if row >= 0:
                target.extra[key] = target.embeddings[row]
                continue
        missing.append(s)
    missing = np.array(missing, np.int64)
    if len(missing):
        for s, e in zip(missing, embed_crops(locator, target.image, missing)):
            target.extra[tuple(s)] = e


# ------------------------------------------------------------------------------------------------
# Pose: the target brought into the template's pose before matching.


def align(
    template: Grid,
    target: Grid,
    locator: Locator,
    *,
    rounds: int = 2,
    anchors: int = 300,
    progress: bool = False,
) -> tuple[Grid, tuple[np.ndarray, np.ndarray]]:
    """`(aligned grid, pose)`: the target brought into the template's pose, and the rigid pose
    `(R, t)` (target mm ~ R @ template mm + t) that does it (`apply_pose` maps points found in the
    aligned grid back into the target).

    Each round matches `anchors` of the template grid's crop centres (evenly spread) on the
    coarse grid of the current aligned target, maps them back through the current pose, and fits
    a rigid pose to all pairs (`fit_rigid`). Matches of rotated crops are drawn towards the
    unrotated position (a 10.8 degree rotation was estimated as 3.8 degrees in one round), so
    each round takes off part of the remaining rotation."""
    every = max(1, len(template.starts) // anchors)
    points = geometry.crop_centres_mm(template.starts[::every], locator.crop_shape, template.affine)
    ndim = points.shape[1]
    pose = (np.eye(ndim), np.zeros(ndim))
    aligned = target
    for _ in range(rounds):
        found, _ = match(points, template, aligned, locator, offset_mm=0.0, refine=False)
        pose = fit_rigid(points, apply_pose(found, pose))
        aligned = aligned_grid(target, pose, template, locator, progress=progress)
    return aligned, pose


def fit_rigid(
    a: np.ndarray, b: np.ndarray, trim: float = 0.25, rounds: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """`(R, t)` minimising |b - (R a + t)| over the pairs kept: each round drops the `trim` share
    with the largest residuals under the previous fit."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.ones(len(a), bool)
    for _ in range(rounds):
        ca, cb = a[keep].mean(0), b[keep].mean(0)
        u, _, vt = np.linalg.svd((a[keep] - ca).T @ (b[keep] - cb))
        d = np.ones(a.shape[1])
        d[-1] = np.sign(np.linalg.det(vt.T @ u.T))  # A rotation, never a reflection.
        r = vt.T @ np.diag(d) @ u.T
        t = cb - r @ ca
        residual = np.linalg.norm(b - (a @ r.T + t), axis=1)
        keep = residual <= np.quantile(residual, 1.0 - trim)
    return r, t


def aligned_grid(
    target: Grid,
    pose: tuple[np.ndarray, np.ndarray],
    template: Grid,
    locator: Locator,
    *,
    progress: bool = False,
) -> Grid:
    """The target resampled onto the template's grid through `pose` (linear; background outside
    the target) and embedded: its anatomy in the template's pose, so crops of both are cut at the
    same orientation. Points found in it map back to the target by `apply_pose`."""
    from scipy import ndimage

    r, t = pose
    shape = template.image.shape
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, len(shape))
    world = geometry.voxel_to_world(index, template.affine) @ r.T + t
    source = geometry.world_to_voxel(world, target.affine).T
    volume = np.asarray(target.image, np.float32)
    # Edge voxels keep their values against rounding ("nearest"); beyond half a voxel outside is
    # background (the image minimum: -1 after normalisation, the lowest HU of raw CT).
    image = ndimage.map_coordinates(volume, source, order=1, mode="nearest")
    outside = np.any((source < -0.5) | (source > np.asarray(volume.shape)[:, None] - 0.5), axis=0)
    image[outside] = volume.min()
    image = image.reshape(shape)
    return embed_volume(
        locator, image, template.affine, f"{target.source} (aligned)", stride=target.stride, progress=progress
    )


def apply_pose(points_mm: np.ndarray, pose: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    r, t = pose
    return np.asarray(points_mm, np.float64) @ r.T + t


# ------------------------------------------------------------------------------------------------
# Files: points CSV in, points CSV out, plots.

COORDINATES = ("x", "y", "z")


def read_points(path: str, ndim: int = 3) -> tuple[list[str], list[list[str]], np.ndarray]:
    """`(header, rows, points (P, ndim) mm)` of a CSV with a header naming at least x, y[, z]
    (world mm, RAS); LocateError naming the file and row for anything else."""
    import csv

    axes = COORDINATES[:ndim]
    try:
        with open(path, newline="") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as e:
        raise LocateError(f"{path}: cannot read the points file ({_one_line(e)})") from None
    if not table:
        raise LocateError(f"{path}: empty points file; expected a header with {', '.join(axes)}")
    header = [h.strip() for h in table[0]]
    missing = [a for a in axes if a not in header]
    if missing:
        raise LocateError(f"{path}: header {header} lacks column(s) {', '.join(missing)} (world mm)")
    cols = [header.index(a) for a in axes]
    points = np.empty((len(table) - 1, ndim))
    for i, row in enumerate(table[1:]):
        try:
            points[i] = [float(row[c]) for c in cols]
        except (IndexError, ValueError):
            raise LocateError(f"{path}: row {i + 2} has no number in column(s) {', '.join(axes)}") from None
    if not np.all(np.isfinite(points)):
        raise LocateError(f"{path}: non-finite coordinates")
    return header, table[1:], points


def write_points(
    path: str, header: list[str], rows: list[list[str]], found: np.ndarray, score: np.ndarray
) -> None:
    """The input rows with x, y[, z] replaced by `found` and a `score` column (mm) added."""
    import csv

    cols = [header.index(a) for a in COORDINATES[: found.shape[1]]]
    out_header = header + ["score"] if "score" not in header else header
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(out_header)
        for row, point, s in zip(rows, found, score):
            row = list(row) + [""] * (len(header) - len(row))
            for c, v in zip(cols, point):
                row[c] = f"{v:.2f}"
            if "score" in header:
                row[header.index("score")] = f"{s:.2f}"
            else:
                row.append(f"{s:.2f}")
            writer.writerow(row)
    os.replace(tmp, path)


def locate_files(
    workdir: str,
    template_path: str,
    target_path: str,
    points_path: str,
    out_path: str,
    *,
    step: int | None = None,
    stride: int = 3,
    offset_mm: float = 12.0,
    align_rounds: int = 3,
    normalisation: Mapping[str, Any] | None = None,
    plot_dir: str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """`isimed-locate`: the points of `points_path` found in the target, written to `out_path`;
    embedded grids cached next to it (`<out dir>/locate_cache/`). With `align_rounds`, the target
    is first brought into the template's pose (`align`). Returns a summary."""
    import time

    locator = load_locator(workdir, step, normalisation=normalisation)
    ndim = len(locator.crop_shape)
    header, rows, points = read_points(points_path, ndim)
    folder = os.path.join(os.path.dirname(os.path.abspath(out_path)), "locate_cache")
    grids, seconds = [], {}
    for role, path in (("template", template_path), ("target", target_path)):
        start = time.time()
        image, affine, source = read_volume(path, locator)
        where = cache_path(folder, path, locator, stride) if cache else None
        grids.append(
            embed_volume(locator, image, affine, source, stride=stride, cache=where, progress=progress)
        )
        seconds[f"embed_{role}_s"] = round(time.time() - start, 2)
        if role == "template":  # Points outside it: said before the target's work is done.
            _queries(points, grids[0], locator.crop_shape, _offsets(0.0, len(locator.crop_shape)))
    template, target = grids
    pose = None
    if align_rounds:
        start = time.time()
        target, pose = align(template, target, locator, rounds=align_rounds, progress=progress)
        seconds["align_s"] = round(time.time() - start, 2)
    start = time.time()
    found, score = match(points, template, target, locator, offset_mm=offset_mm)
    seconds["match_s"] = round(time.time() - start, 2)
    reported = found if pose is None else apply_pose(found, pose)
    write_points(out_path, header, rows, reported, score)
    if plot_dir:  # With alignment: the target in the template's pose, where the match was made.
        plot_matches(
            plot_dir,
            points,
            found,
            score,
            template,
            target,
            locator,
            offset_mm=offset_mm,
            reported_mm=reported,
            names=_point_names(header, rows),
        )
    return {"points": len(points), "out": out_path, "encoder": locator.name, **seconds}


def _point_names(header: list[str], rows: list[list[str]]) -> list[str] | None:
    """The points' names from a `name` or `label` column ("" where a row is short), else None."""
    column = next((c for c in ("name", "label") if c in header), None)
    if column is None:
        return None
    c = header.index(column)
    return [row[c] if c < len(row) else "" for row in rows]


def plot_matches(
    folder: str,
    points_mm: np.ndarray,
    found_mm: np.ndarray,
    score: np.ndarray,
    template: Grid,
    target: Grid,
    locator: Locator,
    *,
    offset_mm: float = 12.0,
    reported_mm: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """One PNG per point: the template's three orthogonal slices through the point (top) and the
    target's through the found point (bottom) with the coarse cost map overlaid (low cost = bright
    in the overlay), drawn at the voxels' physical aspect. 3D only; returns the files written.
    `reported_mm`: the found points as written (in the target's own frame when `target` is an
    aligned grid), for the titles; `names`: the points' names, for the titles. Figures never
    meet pyplot, so a notebook's backend is left as it was."""
    from isimed.evaluation import plots

    if template.image.ndim != 3:
        raise LocateError("plots are drawn for 3D images only")
    os.makedirs(folder, exist_ok=True)
    costs = cost_maps(points_mm, template, target, locator, offset_mm=offset_mm)
    written = []
    reported = found_mm if reported_mm is None else reported_mm
    for i, (p, q) in enumerate(zip(points_mm, found_mm)):
        cost = _cost_on_voxels(costs[i], target, locator.crop_shape)
        fig = plots.figure(2, 3, panel=(3.0, 3.0))
        axes = fig.subplots(2, 3)
        for row, (g, point, overlay) in enumerate(((template, p, None), (target, q, cost))):
            spacing = geometry.spacing_from_affine(g.affine)
            index = np.clip(
                np.round(geometry.world_to_voxel(point, g.affine)).astype(int),
                0,
                np.asarray(g.image.shape) - 1,
            )
            for axis in range(3):
                ax = axes[row, axis]
                cut = tuple(index[a] if a == axis else slice(None) for a in range(3))
                rest = [a for a in range(3) if a != axis]
                aspect = float(spacing[rest[1]] / spacing[rest[0]])  # Millimetres look square.
                ax.imshow(np.asarray(g.image[cut], np.float32).T, cmap="gray", origin="lower", aspect=aspect)
                if overlay is not None:
                    similarity = np.exp(-overlay[cut] / max(float(score[i]), 1.0))
                    ax.imshow(
                        similarity.T, cmap="hot", alpha=0.45, origin="lower", vmin=0, vmax=1, aspect=aspect
                    )
                ax.plot(index[rest[0]], index[rest[1]], "c+", markersize=12)
                ax.set_xticks([])
                ax.set_yticks([])
            label = "target" + (" in the template's pose" if target.source.endswith("(aligned)") else "")
            axes[row, 0].set_ylabel("template" if row == 0 else f"{label}, score {score[i]:.1f} mm")
        name = names[i] if names is not None else f"point {i + 1}"
        fig.suptitle(
            f"{name}: ({', '.join(f'{v:.1f}' for v in p)}) -> "
            f"({', '.join(f'{v:.1f}' for v in reported[i])}) mm"
        )
        written.append(plots.save(fig, os.path.join(folder, f"point_{i + 1:04d}.png")))
    return written


def _cost_on_voxels(cost: np.ndarray, target: Grid, crop: Sequence[int]) -> np.ndarray:
    """A lattice cost map on the target's voxels: each voxel takes the cost of the nearest lattice
    crop centre (inf outside the lattice's reach)."""
    shape = np.asarray(target.image.shape)
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    cell = np.round((index - (np.asarray(crop) - 1) / 2 - target.origin) / target.stride).astype(np.int64)
    cell = np.clip(cell, 0, np.asarray(cost.shape) - 1)
    return cost[tuple(np.moveaxis(cell, -1, 0))]
