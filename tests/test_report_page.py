"""report.html, the page a study coordinator reads: rendered by a real
headless browser (Debian's Chromium, which `make test` installs), without
script errors, its totals equal to the JSON report's; and small for a run
of a million images."""
import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_pipeline
from transforms import report_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own check starts it: no sandbox (root), and none of the
# background connections a closed network refuses.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]


def chromium(page: Path, tmp_path: Path, *args: str):
  if CHROMIUM is None:
    pytest.fail("Chromium is not installed: `make test` installs it "
                "(Debian's chromium package)")
  return subprocess.run(
      [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args,
       page.as_uri()], capture_output=True, text=True, timeout=120)


class _Figures(html.parser.HTMLParser):
  """data-total figures and the body's attributes of a rendered page."""

  def __init__(self):
    super().__init__()
    self.totals, self.body, self.bars = {}, {}, {}

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "body":
      self.body = attrs
    if "data-total" in attrs:
      self.totals[attrs["data-total"]] = float(attrs["data-v"])
    if "data-bar" in attrs:
      self.bars[(attrs["data-bar"], attrs["data-label"])] = float(
          attrs["data-v"])


@pytest.mark.parametrize("plan", [False, True])
def test_the_page_renders_in_chromium_with_the_reports_totals(
    sample, tmp_path, plan):
  root, _ = sample
  report = run_pipeline(root, tmp_path / "out", *(["--plan"] if plan else []))
  page = Path(report["report_page"])
  assert page.name == ("plan.html" if plan else "report.html")
  assert page.parent == Path(report["report_path"]).parent
  shot = tmp_path / "page.png"
  done = chromium(page, tmp_path, "--window-size=1200,2000",
                  f"--screenshot={shot}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert shot.stat().st_size > 20_000 and shot.read_bytes()[:4] == b"\x89PNG"
  dom = chromium(page, tmp_path, "--dump-dom")
  assert dom.returncode == 0
  # Script errors are logged to stderr as console messages.
  assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr
  figures = _Figures()
  figures.feed(dom.stdout)
  assert figures.body.get("data-ready") == "1"   # the script ran to its end
  on_page = figures.totals
  json_report = json.loads(Path(report["report_path"]).read_text())
  summary = json_report["summary"]
  for key in ("entities", "images_seen", "kept", "flagged", "rejected",
              "failed", "studies"):
    assert on_page[key] == summary[key], key
  if plan:
    assert on_page["studies_to_write"] == summary["studies_to_write"] == 6
    assert "nothing was written" in dom.stdout
  else:
    assert on_page["objects"] == summary["objects"] == 6
    assert on_page["object_bytes"] == summary["object_bytes"]
  assert sum(v for (chart, _), v in figures.bars.items()
             if chart == "modality") == summary["kept"]


def test_the_page_stays_small_for_a_million_images():
  studies = [{"uri": f"gs://b/Collection/C/Entity/E{i % 300}/E_{i}.tar.gz",
              "entity_id": f"E{i % 300}", "instances": 200,
              "input_bytes": 100_000_000, "size_bytes": 40_000_000,
              "outcome": "written", "modalities": {"CT": 150, "MR": 50}}
             for i in range(5000)]
  rejected = [{"path": f"gs://in/E1/f{i}.dcm", "entity_id": "E1",
               "reason": f"duplicate SOPInstanceUID 1.2.{i}.4: x is stored"}
              for i in range(20_000)]
  report = {"run_id": "r", "collection": "C", "summary": {
      "kept": 1_000_000, "studies": 5000, "rejected": 20_000},
            "studies": studies, "rejected": rejected, "flagged": [],
            "failed": []}
  page = report_html.render(report)
  assert len(page.encode()) < 1_000_000
  assert "4,000 more studies not shown" in page
  assert f"{20_000 - report_html.MAX_FILE_ROWS:,} more not shown" in page
  # Grouped by why, not by file: one bar for all the duplicates.
  assert page.count('data-bar="reason"') == 1


def test_reasons_are_grouped_without_what_is_particular_to_a_file():
  kind = report_html.reason_kind
  assert kind("duplicate SOPInstanceUID 1.2.840.1: a.dcm is stored instead"
              ) == "duplicate SOPInstanceUID …"
  assert kind("PHI rule 'folder': lies under a 'PHI' folder of its entity"
              ) == "PHI rule 'folder'"
  assert kind("header lacks StudyInstanceUID") == "header lacks StudyInstanceUID"
