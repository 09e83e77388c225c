"""Build deterministic benchmark corpora out of real DICOM files.

Why real files: compression speed and ratio depend on the pixel content, so
synthetic noise or constant images would give misleading numbers. The sources
are the real sample files that pip packages ship offline: pydicom's own test
files and the `pydicom-data` wheel (its files live inside the wheel, so
`get_testdata_file` finds them locally; nothing is downloaded).

Every output file is a real source dataset re-saved with fresh, seeded UIDs
(Study/Series/SOP Instance UID and MediaStorageSOPInstanceUID) and one
StudyDate/AccessionNumber per study. To get distinct files without making the
data unrealistically compressible, uncompressed pixel arrays are varied by a
cyclic shift ("roll") or by cutting a window out of a larger real image
("crop"); tiling a small image was avoided on purpose, because repeats a few
hundred bytes apart fall inside deflate's 32 KiB window and would flatter every
compressor. Compressed sources ("copy") keep their pixel data byte for byte.

Corpora (cached under bench/.corpus/<label>/, rebuilt only if the recipe
changed; `manifest.json` is written last and marks a complete build):
  large        ~1 GB x scale, 6 entities, 12 studies, ~88% uncompressed bytes
  small-files  ~5,100 x scale CT-series-shaped images of <= ~300 KB each
  mem-0.25, mem-0.5, mem-1, mem-2
               one entity, one study of that many GB x scale (memory mode)
  mixed        shaped like a real export: one study of ~240 CR images of
               ~2.4 MB, ~600 small CT slices over 4 studies, 3 small entities,
               and 3 bad files (text, empty, header cut short) in entity folders
  tiny         20 small CT slices in 2 entities (the fixed cost of a run)
  small-8000   8,000 small CT slices of ~39 KB: 80 entities x 10 studies x 10
               images (scale multiplies the entities)
  small-8000-extra
               one more entity of 100 such images, 10 studies (re-run case)

A corpus's "bad_files" (mixed) are in its input but in no study of the manifest:
the pipeline must reject each of them.

Usage: corpus.py NAME [NAME ...] [--scale S]; prints one corpus dir per line.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset
from pydicom.uid import UID, generate_uid

BENCH_DIR = Path(__file__).resolve().parent
CORPUS_ROOT = BENCH_DIR / ".corpus"
RECIPE_VERSION = 1  # bump whenever the recipe below changes: forces a rebuild
SEED = "dicom-bench-2024"
GB = 10**9


@dataclass(frozen=True)
class Series:
    """One series: `amount` is a share of the corpus bytes or an image count."""

    source: str  # file name known to pydicom.data.get_testdata_file
    mode: str  # "roll", "crop<N>" (N x N window) or "copy" (compressed, as is)
    amount: float


@dataclass(frozen=True)
class Study:
    entity: str
    date: str
    series: tuple[Series, ...]


def _s(entity: str, date: str, *series: tuple[str, str, float]) -> Study:
    return Study(entity, date, tuple(Series(*s) for s in series))


# Amounts are shares of the target bytes. Compressed ("copy") series add up to
# 12%: real archives are mostly uncompressed pixel data.
LARGE = [
    _s("PAT001", "20190314", ("RG1_UNCI.dcm", "roll", 0.10)),
    _s("PAT001", "20210622", ("MR2_UNCI.dcm", "roll", 0.10)),
    _s("PAT002", "20180105", ("693_UNCI.dcm", "roll", 0.12)),
    _s("PAT002", "20200930", ("US1_UNCI.dcm", "roll", 0.03), ("gdcm-US-ALOKA-16.dcm", "roll", 0.03)),
    _s("PAT003", "20170711", ("MR2_UNCI.dcm", "roll", 0.12)),
    _s("PAT003", "20221118", ("RG3_UNCI.dcm", "roll", 0.08), ("RG1_J2KR.dcm", "copy", 0.03)),
    _s("PAT004", "20160229", ("eCT_Supplemental.dcm", "roll", 0.08)),
    _s("PAT004", "20230403", ("color3d_jpeg_baseline.dcm", "copy", 0.04), ("MR2_J2KR.dcm", "copy", 0.02)),
    _s("PAT005", "20191201", ("693_UNCI.dcm", "roll", 0.08)),
    # Same patient, same day, second study: names must still not collide.
    _s("PAT005", "20191201", ("RG3_UNCI.dcm", "roll", 0.06)),
    _s("PAT006", "20150817", ("MR-SIEMENS-DICOM-WithOverlays.dcm", "roll", 0.05)),
    _s("PAT006", "20240106", ("RG3_J2KR.dcm", "copy", 0.03), ("gdcm-US-ALOKA-16.dcm", "roll", 0.03)),
]

# Amounts are image counts (x scale): many small CT/MR slices per series.
SMALL_FILES = [
    _s("CTP001", "20200102", ("CT_small.dcm", "roll", 600), ("693_UNCI.dcm", "crop256", 400)),
    _s("CTP001", "20210315", ("693_UNCI.dcm", "crop256", 700)),
    _s("CTP002", "20190620", ("CT_small.dcm", "roll", 800), ("MR2_UNCI.dcm", "crop256", 300)),
    _s("CTP002", "20220808", ("693_UNCI.dcm", "crop256", 500), ("693_UNCI.dcm", "crop384", 150)),
    _s("CTP003", "20180411", ("CT_small.dcm", "roll", 900), ("emri_small.dcm", "roll", 200)),
    _s("CTP003", "20230127", ("MR2_UNCI.dcm", "crop256", 450), ("693_UNCI.dcm", "crop384", 100)),
]

# One study mixing few large radiographs with many CT-sized slices.
MEMORY = [
    _s("MEMPAT", "20200501", ("RG1_UNCI.dcm", "roll", 0.35), ("MR2_UNCI.dcm", "roll", 0.25),
       ("693_UNCI.dcm", "roll", 0.40)),
]

# Shaped like a real export (amounts are image counts x scale): one large
# study of multi-MB radiographs (1100 x 1100 windows of real CR images,
# 2.4 MB each: "roll" would keep the sources' 6-7 MB), one entity of many
# small CT slices over a few studies, a few small entities of a few images.
MIXED = [
    _s("BIG001", "20230514", ("RG1_UNCI.dcm", "crop1100", 120), ("RG3_UNCI.dcm", "crop1100", 120)),
    _s("CTS001", "20200102", ("CT_small.dcm", "roll", 150)),
    _s("CTS001", "20200715", ("CT_small.dcm", "roll", 150)),
    _s("CTS001", "20210304", ("CT_small.dcm", "roll", 150)),
    _s("CTS001", "20220911", ("CT_small.dcm", "roll", 150)),
    _s("FEW001", "20190823", ("693_UNCI.dcm", "roll", 3)),
    _s("FEW002", "20180417", ("emri_small.dcm", "roll", 4)),
    _s("FEW003", "20170130", ("US1_UNCI.dcm", "roll", 2)),
    _s("FEW003", "20211206", ("MR-SIEMENS-DICOM-WithOverlays.dcm", "roll", 3)),
]


@dataclass(frozen=True)
class BadFile:
    """A file the pipeline must reject, placed inside an entity folder."""

    path: str  # relative to the input dir
    kind: str  # "text", "empty" or "truncated" (a real DICOM file cut inside its header)


# Not in the manifest's "files" or "studies": listed under "bad_files".
MIXED_BAD = (
    BadFile("CTS001/notes.txt", "text"),
    BadFile("FEW001/empty.dcm", "empty"),
    BadFile("BIG001/extra/IM99999.dcm", "truncated"),
)

TINY = [
    _s("TINY01", "20200301", ("CT_small.dcm", "roll", 10)),
    _s("TINY02", "20200302", ("CT_small.dcm", "roll", 10)),
]


def many_small(prefix: str, entities: int, studies: int = 10, images: int = 10) -> list[Study]:
    """`entities` entities of `studies` studies of `images` CT_small slices each
    (~39 KB), every study on its own date."""
    first = datetime.date(2015, 1, 1)
    return [_s(f"{prefix}{e + 1:03d}",
               (first + datetime.timedelta(days=e * studies + j)).strftime("%Y%m%d"),
               ("CT_small.dcm", "roll", images))
            for e in range(entities) for j in range(studies)]


def small_8000(scale: float) -> list[Study]:
    """80 entities x 10 studies x 10 images at scale 1; scale multiplies the
    entities, so a smaller scale keeps the shape (and is a prefix)."""
    return many_small("S8K", max(1, round(80 * scale)))


@dataclass(frozen=True)
class Recipe:
    """`studies` is a list, or a function of the scale giving one.
    `target`: bytes at scale 1 (amounts are byte shares), or None (amounts
    are image counts, multiplied by the scale unless `studies` is a function,
    which scales the corpus itself)."""

    studies: list[Study] | Callable[[float], list[Study]]
    target: float | None = None
    bad_files: tuple[BadFile, ...] = ()

    def plan(self, scale: float) -> tuple[list[Study], float]:
        """The studies at this scale and the scale to apply to their amounts."""
        if callable(self.studies):
            return self.studies(scale), 1.0
        return self.studies, scale


CORPORA: dict[str, Recipe] = {
    "large": Recipe(LARGE, 1.0 * GB),
    "small-files": Recipe(SMALL_FILES),
    "mem-0.25": Recipe(MEMORY, 0.25 * GB),
    "mem-0.5": Recipe(MEMORY, 0.5 * GB),
    "mem-1": Recipe(MEMORY, 1.0 * GB),
    "mem-2": Recipe(MEMORY, 2.0 * GB),
    "mixed": Recipe(MIXED, bad_files=MIXED_BAD),
    "tiny": Recipe(lambda scale: TINY),  # fixed: the scale does not apply
    "small-8000": Recipe(small_8000),
    # one more entity (fresh UIDs, a name no small-8000 entity has): the re-run case
    "small-8000-extra": Recipe(lambda scale: many_small("NEW", 1)),
}


@dataclass
class Source:
    """A decoded real file: header template plus pixels (or raw compressed)."""

    template: FileDataset  # PixelData removed unless the syntax is compressed
    pixels: np.ndarray | None  # decoded pixels of an uncompressed source
    file_size: int
    frames: int


@cache
def load_source(name: str) -> Source:
    path = get_testdata_file(name)
    if path is None:
        sys.exit(f"{name}: not found; is pydicom-data installed?")
    ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    pixels = None
    if not ts.is_compressed:
        if not ts.is_little_endian:
            sys.exit(f"{name}: big endian sources are not supported")
        pixels = ds.pixel_array
        del ds.PixelData
    return Source(ds, pixels, Path(path).stat().st_size, int(ds.get("NumberOfFrames", 1) or 1))


def estimated_size(series: Series) -> int:
    """File size of one output image, to turn a byte share into a count."""
    src = load_source(series.source)
    if not series.mode.startswith("crop"):
        return src.file_size
    assert src.pixels is not None
    n = int(series.mode[4:])
    per_pixel = src.pixels.itemsize * int(src.template.SamplesPerPixel)
    full = src.pixels.size * src.pixels.itemsize
    return src.file_size - full + n * n * per_pixel * src.frames


def make_pixels(src: Source, mode: str, rng: random.Random) -> np.ndarray:
    """Vary real pixels without changing their statistics (see module doc)."""
    assert src.pixels is not None
    arr = src.pixels
    row_axis = 1 if src.frames > 1 else 0
    rows, cols = arr.shape[row_axis], arr.shape[row_axis + 1]
    if mode == "roll":
        shift = (rng.randrange(rows), rng.randrange(cols))
        return np.roll(arr, shift, axis=(row_axis, row_axis + 1))
    n = int(mode[4:])
    y, x = rng.randrange(rows - n + 1), rng.randrange(cols - n + 1)
    index = [slice(None)] * arr.ndim
    index[row_axis], index[row_axis + 1] = slice(y, y + n), slice(x, x + n)
    return np.ascontiguousarray(arr[tuple(index)])


def uid(*parts: object) -> str:
    """Deterministic UID: same seed and parts give the same UID on every run."""
    return generate_uid(entropy_srcs=[SEED, *map(str, parts)])


def make_instance(src: Source, series: Series, ids: dict[str, str], number: int,
                  rng: random.Random) -> FileDataset:
    """One re-saved real dataset: new pixels variant, fresh identity per study."""
    ds = copy.deepcopy(src.template)
    if src.pixels is not None:
        arr = make_pixels(src, series.mode, rng)
        ds.Rows, ds.Columns = arr.shape[-3:-1] if ds.SamplesPerPixel > 1 else arr.shape[-2:]
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        if ds.SamplesPerPixel > 1:
            ds.PlanarConfiguration = 0  # pixel_array is always colour-by-pixel
    ds.PatientID = ids["entity"]
    ds.PatientName = f"BENCH^{ids['entity']}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ids["study_uid"], ids["series_uid"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(ids["sop_uid"])
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = ids["for_uid"]
    ds.StudyDate = ds.SeriesDate = ids["date"]
    if "ContentDate" in ds:
        ds.ContentDate = ids["date"]
    ds.AccessionNumber, ds.StudyID = ids["accession"], ids["study_id"]
    ds.SeriesNumber, ds.InstanceNumber = int(ids["series_number"]), number
    return ds


def plan_counts(studies: list[Study], target: float | None, scale: float) -> list[list[int]]:
    """Images per series: byte shares -> counts, or counts x scale."""
    if target is None:
        return [[max(1, round(s.amount * scale)) for s in st.series] for st in studies]
    return [[max(1, round(s.amount * target * scale / estimated_size(s))) for s in st.series]
            for st in studies]


@dataclass(frozen=True)
class StudyJob:
    """Everything one study's files depend on: studies are written in parallel."""

    name: str
    index: int
    study: Study
    counts: tuple[int, ...]
    nested: bool
    flat_start: int  # flat layout: files before this study in its entity folder
    input_dir: Path


def write_study(job: StudyJob) -> dict[str, Any]:
    """Write one study's files; returns its manifest entry. Each file depends
    only on the job and its own seeded RNG, so the bytes do not depend on
    which process writes them, or in what order."""
    study = job.study
    key = f"{job.name}/{job.index}"  # scale-independent: smaller scales are prefixes
    accession = f"A{uid(key, 'acc')[-8:]}"
    ids = {"entity": study.entity, "date": study.date, "accession": accession,
           "study_uid": uid(key), "study_id": str(job.index + 1)}
    files: list[str] = []
    nbytes = 0
    n = job.flat_start
    for k, (series, count) in enumerate(zip(study.series, job.counts, strict=True)):
        src = load_source(series.source)
        ids |= {"series_uid": uid(key, k), "for_uid": uid(key, k, "for"),
                "series_number": str(k + 1)}
        for i in range(count):
            rng = random.Random(f"{SEED}/{key}/{k}/{i}")
            ds = make_instance(src, series, ids | {"sop_uid": uid(key, k, i)}, i + 1, rng)
            if job.nested:
                rel = (f"{study.entity}/{study.date}_{accession}/"
                       f"S{k + 1:02d}_{ds.Modality}/IM{i + 1:05d}.dcm")
            else:
                n += 1
                rel = f"{study.entity}/DICOM/I{n:07d}"
            path = job.input_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            nbytes += path.stat().st_size
            files.append(rel)
    return {"entity": study.entity, "study_uid": ids["study_uid"], "date": study.date,
            "accession": accession, "bytes": nbytes, "files": files}


def run_jobs(jobs: list[StudyJob]) -> list[dict[str, Any]]:
    """Write every study, one process per core when there are several (an
    8,000-file corpus takes half the time); results in the jobs' order."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2:
        return [write_study(job) for job in jobs]
    for job in jobs:  # decoded once here, inherited by the forked workers
        for series in job.study.series:
            load_source(series.source)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(write_study, jobs, chunksize=1)


def write_bad_file(input_dir: Path, bad: BadFile) -> dict[str, Any]:
    """Write one file the pipeline must reject; returns its manifest entry."""
    path = input_dir / bad.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if bad.kind == "text":
        data = b"Exported by the PACS on 2023-05-14. Not an image.\n" * 4
    elif bad.kind == "empty":
        data = b""
    elif bad.kind == "truncated":
        # A real file with fresh UIDs, cut inside its file meta group: after
        # the preamble and "DICM", before the dataset's UIDs.
        series = Series("CT_small.dcm", "roll", 1)
        key = f"bad/{bad.path}"
        ids = {"entity": bad.path.split("/")[0], "date": "20230514", "accession": "ABAD",
               "study_uid": uid(key), "study_id": "1", "series_uid": uid(key, 0),
               "for_uid": uid(key, 0, "for"), "series_number": "1", "sop_uid": uid(key, 0, 0)}
        ds = make_instance(load_source(series.source), series, ids, 1, random.Random(key))
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()[:200]
    else:
        raise ValueError(f"unknown bad file kind {bad.kind!r}")
    path.write_bytes(data)
    return {"path": bad.path, "kind": bad.kind, "bytes": len(data)}


def build(name: str, scale: float = 1.0, root: Path = CORPUS_ROOT) -> Path:
    """Build corpus `name` (or reuse the cached one); returns its directory.

    Layout: <dir>/input/<entity>/... and <dir>/manifest.json. Even-numbered
    entities use a nested PACS-export layout (<study>/<series>/IMnnnnn.dcm),
    odd ones a flat CD-style folder of extension-less files with studies
    interleaved, so the pipeline must find files at any depth and group by
    the header, not the path.
    """
    recipe_ = CORPORA[name]
    studies, amount_scale = recipe_.plan(scale)
    target = recipe_.target
    label = name if scale == 1 else f"{name}-x{scale:g}"
    out = root / label
    recipe = {"name": name, "scale": scale, "seed": SEED, "version": RECIPE_VERSION,
              "pydicom": pydicom.__version__}
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("recipe") == recipe:
        return out
    started = time.monotonic()
    tmp = root / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    entities = sorted({st.entity for st in studies})
    flat_counter: dict[str, int] = {}
    jobs: list[StudyJob] = []
    for si, (study, counts) in enumerate(zip(studies, plan_counts(studies, target, amount_scale),
                                             strict=True)):
        nested = entities.index(study.entity) % 2 == 0
        flat_start = flat_counter.get(study.entity, 0)  # flat files are numbered on per entity
        if not nested:
            flat_counter[study.entity] = flat_start + sum(counts)
        jobs.append(StudyJob(name, si, study, tuple(counts), nested, flat_start, tmp / "input"))
    manifest_studies = run_jobs(jobs)
    manifest = {"recipe": recipe, "input_dir": "input",
                "files": sum(len(s["files"]) for s in manifest_studies),
                "bytes": sum(s["bytes"] for s in manifest_studies),
                "entities": len(entities), "build_seconds": round(time.monotonic() - started, 1),
                "studies": manifest_studies}
    if recipe_.bad_files:  # not files of any study: the pipeline must reject each
        manifest["bad_files"] = [write_bad_file(tmp / "input", bad) for bad in recipe_.bad_files]
        manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=sorted(CORPORA))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="size knob: multiplies bytes (or image counts; entities for small-8000)")
    parser.add_argument("--root", type=Path, default=CORPUS_ROOT)
    args = parser.parse_args()
    for name in args.names:
        out = build(name, args.scale, args.root)
        m = json.loads((out / "manifest.json").read_text())
        print(out, flush=True)
        bad = f" + {len(m['bad_files'])} bad files" if m.get("bad_files") else ""
        print(f"  {m['files']} files{bad}, {m['bytes'] / 1e6:.1f} MB, {len(m['studies'])} studies, "
              f"{m['entities']} entities, built in {m['build_seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
