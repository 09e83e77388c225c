"""Options: an argument that neither this pipeline nor Beam knows stops the
run before any work (Beam alone would drop it with a warning and run on)."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.options import OptionsError, check_arguments

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("argv, message", [
    (["--phi_rulez=folder,header,deid"],
     "unknown option --phi_rulez; did you mean --phi_rules?"),
    (["--phi_rulez", "folder,header,deid"],
     "unknown option --phi_rulez; did you mean --phi_rules?"),
    (["--overwrit"], "unknown option --overwrit; did you mean --overwrite?"),
    # Beam's own options are checked too.
    (["--temp_locaton=/tmp/t"],
     "unknown option --temp_locaton; did you mean --temp_location?"),
    (["--xyzzy=1"], "unknown option --xyzzy (see --help)"),
    (["stray"], "unexpected argument 'stray'"),
    (["--compression_level=x"], "invalid int value: 'x'"),
])
def test_unknown_or_malformed_argument_is_refused(argv, message):
  with pytest.raises(OptionsError) as refused:
    check_arguments(["--input=/in", "--collection=C1", *argv])
  assert message in str(refused.value)


def test_known_arguments_pass():
  check_arguments(["--input=/in", "--bucket", "gs://b", "--collection=C1",
                   "--phi_rules=folder,header,deid", "--overwrite",
                   "--runner=DataflowRunner", "--project=demo-project",
                   "--temp_location=gs://b/tmp", "--direct_num_workers=2",
                   "--experiments=use_runner_v2"])


def test_misspelled_phi_rules_stops_the_run_before_any_work(sample, tmp_path):
  root, _ = sample
  done = subprocess.run(
      [sys.executable, "-m", "pipeline", f"--input={root}",
       f"--bucket={tmp_path / 'bucket'}", "--collection=IRB41449",
       f"--metadata_output={tmp_path / 'metadata'}",
       "--phi_rulez", "folder,header,deid"],
      capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: unknown option --phi_rulez; did you mean --phi_rules?"]
  assert not (tmp_path / "bucket").exists()
  assert not (tmp_path / "metadata").exists()
