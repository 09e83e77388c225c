"""Ready for Dataflow, checked offline: the job built by the Dataflow
runner against the storage emulator; a worker that has only what setup.py
ships running the staged job; the flex-template launcher built as
templates/Dockerfile builds it; and the Dataflow path of the graph (no
local spill) on another Beam runner, giving the local path's objects."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner

from conftest import IN_PROCESS, read_rows, run_pipeline
from test_cloud import upload_tree
from transforms.gcs import storage_client

REPO = Path(__file__).parents[1]
PINNED = re.search(r'BEAM_VERSION = "([^"]+)"',
                   (REPO / "setup.py").read_text()).group(1)
DOCKERFILE = REPO / "templates" / "Dockerfile"


# Rows go to a local folder: the storage emulator refuses the batch copies
# with which Beam's text sink finalizes its files on Cloud Storage (real
# Cloud Storage takes them); the staged job is run on this machine.
def _dataflow_argv(out_bucket: str, template: str, rows: Path):
  return ["--input=gs://dataflow-in/in", f"--bucket=gs://{out_bucket}",
          "--collection=IRB41449", f"--metadata_output={rows}",
          "--runner=DataflowRunner", "--project=demo-project",
          "--region=us-central1", f"--temp_location=gs://{out_bucket}/tmp",
          f"--template_location=gs://{out_bucket}/{template}"]


@pytest.fixture(scope="module")
def built_job(emulators, sample, tmp_path_factory):
  """The job as Dataflow would get it, built offline: the template and
  what it stages (pipeline.pb, workflow.tar.gz) downloaded."""
  root, made = sample
  emulators["create_bucket"]("dataflow-in")
  emulators["create_bucket"]("dataflow")
  upload_tree(root, "dataflow-in", "in")
  rows = tmp_path_factory.mktemp("dataflow_rows")
  done = subprocess.run(
      [sys.executable, "-m", "pipeline",
       *_dataflow_argv("dataflow", "t.json", rows), "--setup_file=./setup.py"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  local = tmp_path_factory.mktemp("staged")
  client = storage_client()
  for blob in client.list_blobs("dataflow", prefix="tmp/"):
    name = blob.name.rsplit("/", 1)[-1]
    if name in ("pipeline.pb", "workflow.tar.gz"):
      blob.download_to_filename(str(local / name))
  return done, local, made, rows


@pytest.fixture(scope="module")
def clean_env(built_job, tmp_path_factory):
  """A clean virtual environment with only the staged package and its
  install_requires, as a Dataflow worker has (made once per test run)."""
  staged = built_job[1]
  env_dir = tmp_path_factory.mktemp("clean") / "venv"
  venv.EnvBuilder(with_pip=True).create(env_dir)
  python = env_dir / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                  str(staged / "workflow.tar.gz")], check=True,
                 cwd=env_dir, timeout=900)
  return python


def test_the_job_builds_offline_and_says_where(built_job):
  done, staged, _, rows = built_job
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert done.stdout.strip().splitlines()[-1] == (
      "Built: Dataflow template gs://dataflow/t.json")
  client = storage_client()
  names = {b.name for b in client.list_blobs("dataflow")}
  assert "t.json" in names
  # Nothing ran: no report read or written, no object, no lease left.
  assert not [n for n in names if n.startswith(("Collection/", "Runs/"))]
  assert not list(rows.iterdir())
  assert (staged / "pipeline.pb").stat().st_size > 0


def _pipeline(staged: Path) -> beam_runner_api_pb2.Pipeline:
  return beam_runner_api_pb2.Pipeline.FromString(
      (staged / "pipeline.pb").read_bytes())


def test_the_job_runs_the_pinned_beam_sdk(built_job):
  staged = built_job[1]
  images = set()
  for environment in _pipeline(staged).components.environments.values():
    if environment.urn == "beam:env:docker:v1":
      images.add(beam_runner_api_pb2.DockerPayload.FromString(
          environment.payload).container_image)
  # Dataflow's copy of the Beam SDK image of the pinned version, and the
  # flex template's image is built on the same version.
  assert len(images) == 1
  assert images.pop().endswith(f"/beam_python3.11_sdk:{PINNED}")
  assert f"FROM apache/beam_python3.11_sdk:{PINNED}\n" in (
      DOCKERFILE.read_text())


def test_the_staged_package_is_the_code_and_nothing_test_only(built_job):
  staged = built_job[1]
  with tarfile.open(staged / "workflow.tar.gz") as package:
    names = [n.split("/", 1)[1] for n in package.getnames() if "/" in n]
  assert {n.split("/")[0] for n in names if n.endswith(".py")} == {
      "pipeline", "transforms", "setup.py"}
  assert "transforms/archive_format.py" in names
  assert "pipeline/run.py" in names
  assert not [n for n in names if n.startswith(
      ("tests", "bench", "devtools", "queries", "templates"))]


def test_a_worker_with_only_that_install_runs_the_staged_job(
    built_job, clean_env, emulators, tmp_path, monkeypatch):
  """A Dataflow worker in miniature: the staged pipeline.pb, its Docker
  environment replaced by worker processes started from the clean
  environment (the repository is not on their sys.path), on Beam's
  portable FnApiRunner: the same objects, byte for byte, and the same rows
  as a DirectRunner run of the same input."""
  _, staged, made, rows = built_job
  # The clean environment cannot see the checkout: not a module of it.
  probe = subprocess.run(
      [str(clean_env), "-I", "-c", "import pipeline, transforms; "
       "print(pipeline.__file__); import devtools.sample_data"],
      cwd=tmp_path, capture_output=True, text=True)
  assert "No module named 'devtools'" in probe.stderr
  assert probe.stdout.startswith(str(clean_env.parents[1]))
  proto = _pipeline(staged)
  command = " ".join(shlex.quote(a) for a in (
      str(clean_env), "-I", "-m", "apache_beam.runners.worker.sdk_worker_main"))
  for environment in proto.components.environments.values():
    environment.urn = python_urns.SUBPROCESS_SDK
    environment.payload = command.encode()
  monkeypatch.chdir(tmp_path)
  result = fn_runner.FnApiRunner().run_via_runner_api(
      proto, PipelineOptions(["--direct_num_workers=1"]))
  assert str(result.wait_until_finish()).endswith("DONE")

  emulators["create_bucket"]("direct")
  from pipeline.run import run
  direct = run(["--input=gs://dataflow-in/in", "--bucket=gs://direct",
                "--collection=IRB41449",
                f"--metadata_output={tmp_path / 'direct'}", *IN_PROCESS])
  staged_objects = _objects("dataflow")
  assert staged_objects and staged_objects == _objects("direct")
  assert _rows(rows) == _rows(tmp_path / "direct")
  report = json.loads((rows / "report.json").read_text())
  assert report["summary"]["kept"] == len(made["kept"]) == direct[
      "summary"]["kept"]


def _objects(bucket: str):
  return {b.name: b.download_as_bytes()
          for b in storage_client().list_blobs(bucket, prefix="Collection/")}


def _rows(folder: Path):
  """The rows' content, without what differs between two runs (run id,
  object creation time, bucket, links)."""
  rows = []
  for row in read_rows(folder):
    row.pop("run_id")
    row["storage"] = {k: v for k, v in row["storage"].items()
                      if k not in ("uri", "bucket", "written_at",
                                   "generation", "download_link",
                                   "metadata_link")}
    rows.append(json.dumps(row, sort_keys=True))
  return sorted(rows)


def _dockerfile_steps():
  """The Dockerfile's instructions, each checked to be one this test
  follows: if the Dockerfile changes otherwise, the test must too."""
  steps, text = [], DOCKERFILE.read_text().replace("\\\n", " ")
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    instruction, _, rest = line.partition(" ")
    assert instruction in ("FROM", "COPY", "ARG", "WORKDIR", "RUN", "ENV",
                           "ENTRYPOINT"), f"unfollowed Dockerfile step: {line}"
    if instruction == "RUN":
      assert re.fullmatch(r"pip install --no-cache-dir \.", rest), line
    steps.append((instruction, rest))
  return steps


def test_the_flex_template_launcher_built_as_the_dockerfile_builds_it(
    built_job, clean_env, tmp_path):
  """The launcher image's steps, followed in a folder and the clean
  environment (no Docker engine here): its files, its pip step, its
  environment; then the launcher's command up to job creation."""
  args, env = {}, dict(os.environ)
  workdir = None
  for instruction, rest in _dockerfile_steps():
    if instruction == "ARG":
      name, _, value = rest.partition("=")
      args[name] = value
    elif instruction == "WORKDIR":
      workdir = tmp_path / rest.replace("${WORKDIR}", args.get(
          "WORKDIR", "")).lstrip("/")
      workdir.mkdir(parents=True, exist_ok=True)
    elif instruction == "COPY" and not rest.startswith("--from"):
      *sources, target = rest.split()
      for source in sources:
        dest = workdir / (target if target not in ("./", ".") else "") / (
            Path(source).name if target in ("./", ".") else "")
        if (REPO / source).is_dir():
          shutil.copytree(REPO / source, workdir / target,
                          ignore=shutil.ignore_patterns("__pycache__"))
        else:
          shutil.copyfile(REPO / source, dest)
    elif instruction == "RUN":
      subprocess.run([str(clean_env), "-m", "pip", "install", "--quiet",
                      "--no-cache-dir", "."], cwd=workdir, check=True,
                     timeout=900)
    elif instruction == "ENV":
      name, _, value = rest.partition("=")
      env[name] = value.strip('"').replace(
          "${WORKDIR}", str(workdir))
  assert env["FLEX_TEMPLATE_PYTHON_PY_FILE"] == str(
      workdir / "pipeline" / "__main__.py")
  # What the launcher runs: the template's main file with the job's
  # parameters, from the image's Python.
  launched = subprocess.run(
      [str(clean_env), env["FLEX_TEMPLATE_PYTHON_PY_FILE"],
       *_dataflow_argv("dataflow", "flex.json", tmp_path / "flex_rows"),
       f"--setup_file={env['FLEX_TEMPLATE_PYTHON_SETUP_FILE']}"],
      cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
  assert launched.returncode == 0, launched.stderr[-3000:]
  assert launched.stdout.strip().splitlines()[-1] == (
      "Built: Dataflow template gs://dataflow/flex.json")
  assert storage_client().bucket("dataflow").get_blob("flex.json")


def test_the_dataflow_path_on_another_runner_gives_the_same_objects(
    sample, tmp_path):
  """Records grouped whole (no local spill), as on Dataflow, on Beam's
  BundleBasedDirectRunner: the objects and rows of the local path."""
  root, _ = sample
  local = run_pipeline(root, tmp_path / "local")
  other = run_pipeline(root, tmp_path / "other",
                       "--runner=BundleBasedDirectRunner")
  assert other["summary"]["header_bytes_spilled"] == 0
  assert local["summary"]["header_bytes_spilled"] > 0
  objects = lambda out: {p.relative_to(out).as_posix(): p.read_bytes()  # noqa: E731
                         for p in (out / "bucket").rglob("*.tar.gz")}
  assert objects(tmp_path / "other") == {
      k.replace("local", "other"): v for k, v in
      objects(tmp_path / "local").items()} and objects(tmp_path / "other")
  key = lambda r: (r["sop_instance_uid"], r["storage"]["member_offset"],  # noqa: E731
                   r["storage"]["member_sha256"], json.dumps(r["metadata"],
                                                             sort_keys=True))
  assert sorted(map(key, read_rows(tmp_path / "other" / "metadata"))) == (
      sorted(map(key, read_rows(tmp_path / "local" / "metadata"))))
