"""Build a realistic sample input tree from real DICOM files that pydicom ships.

One folder per entity; several studies per entity, several series per study;
fresh, deterministic UIDs; nested sequences two levels deep, a private tag
and a multi-valued ImageType with LOCALIZER in the headers, for the queries
in queries/; and the kinds of input the pipeline must keep out: a PHI/ folder, a burned-in image, a
non-DICOM file and a corrupt file.

  python -m devtools.sample_data OUT_DIR [--seed N]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

# Real, uncompressed single-frame images shipped with pydicom.
SOURCE_FILES = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm")


def fresh_uid(*parts: object) -> str:
  """A UID that is new to the world but the same for the same parts."""
  return generate_uid(entropy_srcs=[repr(p) for p in parts])


def load_source(name: str) -> Dataset:
  return pydicom.dcmread(get_testdata_file(name))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
  item = Dataset()
  item.CodeValue = value
  item.CodingSchemeDesignator = scheme
  item.CodeMeaning = meaning
  return item


# A second requested procedure, in the second study of every entity: found
# only by a query that looks at every item of the sequence, not the first.
SECOND_PROCEDURE = ("36643-5", "XR Chest 2 Views")
PRIVATE_CREATOR = "DICOMSTORE SAMPLE"
PRIVATE_PROTOCOL_TAG = 0x00091001   # (0009,1001), under PRIVATE_CREATOR


def procedure_codes(entity: int, study: int) -> Sequence:
  """A nested sequence two levels deep: requested procedure codes, each
  with a laterality modifier code inside; the second study of each entity
  has a second procedure, on the right side for entities 1 and 3."""
  first = _code(f"{24627 + study}-{entity}", "LN",
                f"Sample procedure {study + 1}")
  first.ProcedureCodeSequence = Sequence([_code("L0001", "LOCAL", "left")])
  items = [first]
  if study == 1:
    second = _code(SECOND_PROCEDURE[0], "LN", SECOND_PROCEDURE[1])
    side = ("R0001", "LOCAL", "right") if entity % 2 == 0 else (
        "L0001", "LOCAL", "left")
    second.ProcedureCodeSequence = Sequence([_code(*side)])
    items.append(second)
  return Sequence(items)


@dataclasses.dataclass
class Instance:
  entity: str
  study_uid: str
  series_uid: str
  sop_uid: str
  path: Path


def write_instance(source: Dataset, path: Path, *, entity: str, study_uid: str,
                   series_uid: str, sop_uid: str, study_date: Optional[str],
                   accession: Optional[str], series_number: int,
                   instance_number: int, extra: Optional[Dict] = None) -> Path:
  """Saves a copy of a real dataset with new identity attributes, and
  extra attributes by keyword, or by tag for private ones (VR, value)."""
  ds = copy.deepcopy(source)
  ds.PatientID = entity
  ds.PatientName = entity
  ds.StudyInstanceUID = study_uid
  ds.SeriesInstanceUID = series_uid
  ds.SOPInstanceUID = sop_uid
  ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
  if study_date is None:
    ds.pop("StudyDate", None)
  else:
    ds.StudyDate = study_date
  if accession is None:
    ds.pop("AccessionNumber", None)
  else:
    ds.AccessionNumber = accession
  ds.SeriesNumber = series_number
  ds.InstanceNumber = instance_number
  for keyword, value in (extra or {}).items():
    if isinstance(keyword, int):   # a private tag: (VR, value)
      ds.add_new(keyword, *value)
    else:
      setattr(ds, keyword, value)
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path


def build_sample(out: Path, seed: int = 0, entities: int = 3,
                 studies_per_entity: int = 2, series_per_study: int = 2,
                 images_per_series: int = 3) -> Dict[str, List]:
  """Writes the sample tree; returns what it holds, for tests to check."""
  sources = [load_source(n) for n in SOURCE_FILES]
  kept: List[Instance] = []
  flagged: List[Path] = []
  bad: List[Path] = []
  for e in range(entities):
    entity = f"SUBJ{e + 1:03d}"
    for s in range(studies_per_entity):
      study_uid = fresh_uid(seed, entity, s)
      date = f"2019{(e % 12) + 1:02d}{s + 10:02d}"
      # Every third study has no accession number: its item id is UID-based.
      accession = None if (e + s) % 3 == 2 else f"ACC{e + 1:02d}{s + 1:02d}"
      for r in range(series_per_study):
        series_uid = fresh_uid(seed, entity, s, r)
        source = sources[(e + s + r) % len(sources)]
        for i in range(images_per_series):
          sop_uid = fresh_uid(seed, entity, s, r, i)
          path = out / entity / f"study{s + 1}" / f"series{r + 1}" / f"img{i + 1:03d}.dcm"
          write_instance(
              source, path, entity=entity, study_uid=study_uid,
              series_uid=series_uid, sop_uid=sop_uid, study_date=date,
              accession=accession, series_number=r + 1,
              instance_number=i + 1,
              extra={"StudyDescription": f"Sample study {s + 1}",
                     "BodyPartExamined": ("CHEST", "HEAD")[s % 2],
                     "RequestedProcedureCodeSequence": procedure_codes(e, s),
                     # The first series of a study is its localizer.
                     **({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
                        if r == 0 else {}),
                     # A site's private protocol name, under its creator.
                     0x00090010: ("LO", PRIVATE_CREATOR),
                     PRIVATE_PROTOCOL_TAG: ("LO", f"protocol-{r + 1}")})
          kept.append(Instance(entity, study_uid, series_uid, sop_uid, path))
    # What must never leave: a PHI/ quarantine folder and a burned-in image.
    study_uid = fresh_uid(seed, entity, 0)
    flagged.append(write_instance(
        sources[0], out / entity / "PHI" / "study1" / "suspect.dcm",
        entity=entity, study_uid=study_uid,
        series_uid=fresh_uid(seed, entity, "phi"),
        sop_uid=fresh_uid(seed, entity, "phi", 0), study_date="20190110",
        accession=None, series_number=90, instance_number=1))
    flagged.append(write_instance(
        sources[1], out / entity / "study1" / "burned" / "burned.dcm",
        entity=entity, study_uid=study_uid,
        series_uid=fresh_uid(seed, entity, "burned"),
        sop_uid=fresh_uid(seed, entity, "burned", 0), study_date="20190110",
        accession=None, series_number=91, instance_number=1,
        extra={"BurnedInAnnotation": "YES "}))
  # Input that is not a usable image: a note and a file cut short in its header.
  note = out / "SUBJ001" / "notes.txt"
  note.write_text("scanned requisition to follow\n")
  corrupt = out / "SUBJ002" / "study1" / "corrupt.dcm"
  corrupt.write_bytes(kept[0].path.read_bytes()[:200])
  bad += [note, corrupt]
  return {"kept": kept, "flagged": flagged, "bad": bad}


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out", help="folder to create the entity folders in")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  out = Path(args.out)
  if out.exists() and any(out.iterdir()):
    print(f"{out} exists and is not empty; leaving it as it is")
    return
  made = build_sample(out, args.seed)
  print(f"Sample input in {out}: {len(made['kept'])} images to keep, "
        f"{len(made['flagged'])} flagged, {len(made['bad'])} bad files")


if __name__ == "__main__":
  main()
