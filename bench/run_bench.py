"""Time the pipeline against tar/gzip baselines on the same real-DICOM corpus.

Run it with the pipeline's own interpreter (/work/main/.venv/bin/python): the
pipeline is started as `sys.executable -m pipeline ...` so both use one venv.
The corpora are built by corpus.py in the bench venv (it needs pydicom-data),
which this script calls; a cached corpus is reused.

Each method runs as one whole process tree (pipeline, `tar czf`, `tar | pigz`,
python `tarfile`) after the corpus has been read once so that every method
starts with a warm page cache. Measured per run:
  wall       monotonic seconds from start to exit of the root process
  tree RSS   peak of the summed RSS of every process in the run's session or
             below its root, sampled from /proc every --interval seconds.
             /usr/bin/time -v is not enough: its "Maximum resident set size"
             is getrusage's, the largest single process, so a Beam run with
             worker processes (or tar | gzip) is under-reported. That number is
             kept too ("max proc RSS", from wait4), plus the summed PSS, which
             counts pages shared between forked workers once (read only at
             new RSS peaks and every 5th sample: it costs ~16 ms of CPU per
             GB, taken from the run).
  cpu        user+sys seconds of the tree: wait4 of the root (reaped children),
             or the sum sampled from /proc if larger (children never reaped)
  other cpu  CPU seconds the rest of the machine used meanwhile (/proc/stat
             busy time minus the run's own): on a 2-core machine anything
             else running (a test suite, another benchmark) skews the result,
             so a run where it exceeds 10% of wall time is flagged "noisy"
  cores %    cpu / (wall x os.cpu_count()): the share of the machine kept busy
All sizes are decimal: MB = 10**6 bytes, GB = 10**9 bytes.

Corpora (--corpora): large, small-files (all four methods), mixed, small-8000
(pipeline, tar-gzip, tar-pigz), tiny (the pipeline alone: the fixed cost of a
run, against a 1.5 s target). Cases (--cases), each command measured the same way:
  rerun   small-8000: a first run, the same input again (share of the first
          run's time, target <= 15%), then one new entity added to a copy of
          the input (bytes read and objects written against the new entity's)
  export  on a stored run of --stored-corpus: the largest study exported
          against tar xzf of its object; a cohort of a few images over many
          studies (bytes read / the members' compressed bytes, target ~1)
  verify  the same stored run: objects/s, and MB/s with --read_data against
          cat of the objects; a small corpus locally and on the emulators

Results are printed and merged into bench/results.json (one section per
corpus or case).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:  # faster decompression for the ratio check; stdlib zlib otherwise
    from isal import isal_zlib as dzlib
except ImportError:  # pragma: no cover
    dzlib = zlib  # type: ignore[misc]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
RESULTS = BENCH_DIR / "results.json"
METHODS = ("pipeline", "tar-gzip", "tar-pigz", "py-tarfile")
CORPUS_NAMES = ("large", "small-files", "mixed", "tiny", "small-8000")
# Methods by default: the original system's tarfile baseline (the slowest, over
# a minute on large) only where it has always run.
DEFAULT_METHODS = {"large": METHODS, "small-files": METHODS, "tiny": ("pipeline",)}
NEW_CORPUS_METHODS = ("pipeline", "tar-gzip", "tar-pigz")
CASES = ("rerun", "export", "verify")
TINY_TARGET_S = 1.5  # tiny: start-to-exit wall time of a whole run
RERUN_TARGET = 0.15  # an unchanged re-run: at most this share of the first run's time
COLLECTION = "BENCH"
EMULATOR_PROJECT = "demo-project"
MB = 10**6
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PSS_PERIOD_S = 1.0  # read PSS on new RSS peaks and once a second: it costs CPU the run competes for
RSS_GOAL = 1.5e9  # memory mode: peak tree RSS should stay under this, flat


@dataclass
class Measurement:
    """One timed process tree."""

    cmd: str
    rc: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    max_proc_rss: int = 0
    samples: int = 0
    timed_out: bool = False
    other_cpu_s: float = 0.0
    harness_cpu_s: float = 0.0
    log: str = ""
    cpu_probe_s: float = 0.0


def _proc_table() -> dict[int, tuple[int, int, int, float]]:
    """pid -> (ppid, session, rss bytes, cpu s) for every process in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # own utime + stime
        table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[21]) * PAGE, cpu)
    return table


def busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait; guest time is already in user
    return (sum(ticks[:8]) - idle) / CLK_TCK


def cpu_probe_s() -> float:
    """CPU seconds of a fixed pure-Python loop (~0.16 s in a fast phase).
    This machine is a VM whose cores are shared with other tenants: a loop
    like it, five times longer, took 1.6 s to 2.8 s minutes apart, a drift no
    idle check sees. Probed before each run and printed, so a slow phase
    shows in the output."""
    start = time.process_time()
    x = 0
    for i in range(2_000_000):
        x += i * i % 7
    return time.process_time() - start


def wait_idle(limit: float) -> None:
    """Wait (up to `limit` s) for a 2 s window where the machine is <10% busy."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = busy_cpu_s()
        time.sleep(2)
        if busy_cpu_s() - before < 0.2:
            return
    if limit > 0:
        print("(machine still busy; running anyway)", end=" ", flush=True)


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_sample(root: int, pss: bool) -> tuple[int, int, dict[int, float]]:
    """Summed RSS and PSS (0 unless `pss`), and CPU s by pid, of the session
    `root` leads plus root's descendants (also those that left the session).
    RSS is cheap (/proc/PID/stat); PSS walks page tables (~16 ms per GB)."""
    table = _proc_table()
    members = {pid for pid, (_, sid, _, _) in table.items() if sid == root}
    changed = True
    while changed:
        new = {pid for pid, (ppid, _, _, _) in table.items()
               if ppid in members | {root} and pid not in members}
        members |= new
        changed = bool(new)
    members.add(root)
    members &= table.keys()
    return (sum(table[p][2] for p in members), sum(_pss(p) for p in members) if pss else 0,
            {p: table[p][3] for p in members})


def measure(cmd: list[str], cwd: Path, log: Path, timeout: float, interval: float) -> Measurement:
    """Run `cmd` in its own session; sample tree memory until it exits."""
    m = Measurement(cmd=shlex.join(cmd), log=str(log))
    log.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    with open(log, "wb") as out:
        busy_before = busy_cpu_s()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        seen_cpu: dict[int, float] = {}  # last CPU s seen per pid: counts workers never reaped
        pss_every = max(1, round(PSS_PERIOD_S / interval))

        def sample() -> None:
            while not stop.is_set():
                rss, pss, cpu = tree_sample(proc.pid, pss=m.samples % pss_every == 0)
                if rss > m.peak_tree_rss and not pss:  # a new RSS peak: get its PSS too
                    rss, pss, cpu = tree_sample(proc.pid, pss=True)
                seen_cpu.update(cpu)
                m.peak_tree_rss, m.peak_tree_pss = max(m.peak_tree_rss, rss), max(m.peak_tree_pss, pss)
                m.samples += 1
                if time.monotonic() - start > timeout and not m.timed_out:
                    m.timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                stop.wait(interval)
            m.harness_cpu_s = time.thread_time()  # this thread's own cost

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        m.wall_s = time.monotonic() - start
        stop.set()
        sampler.join()
        busy = busy_cpu_s() - busy_before
        proc.returncode = m.rc = os.waitstatus_to_exitcode(status)
    try:  # reap anything the run left behind in its own process group
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    m.cpu_s = max(usage.ru_utime + usage.ru_stime, sum(seen_cpu.values()))
    m.max_proc_rss = usage.ru_maxrss * 1024
    m.other_cpu_s = max(0.0, busy - m.cpu_s - m.harness_cpu_s)
    return m


@dataclass
class Corpus:
    label: str
    root: Path
    manifest: dict[str, Any]

    @property
    def input(self) -> Path:
        return self.root / self.manifest["input_dir"]

    def warm(self) -> None:
        """Read every file once so each method starts with a warm page cache."""
        for study in self.manifest["studies"]:
            for rel in study["files"]:
                with open(self.input / rel, "rb") as f:
                    while f.read(1 << 20):
                        pass


def get_corpus(name: str, scale: float, python: str) -> Corpus:
    """Build (or reuse) a corpus with corpus.py in the bench venv."""
    out = subprocess.run([python, str(BENCH_DIR / "corpus.py"), name, "--scale", str(scale)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    root = Path(out.strip().splitlines()[-1])
    return Corpus(root.name, root, json.loads((root / "manifest.json").read_text()))


StudyJob = tuple[Path, list[str], Path | None]  # archive, relative files, file list


def study_jobs(corpus: Corpus, out: Path, lists: Path | None = None) -> list[StudyJob]:
    """(archive path, relative files, file-list path) per study, lists written."""
    jobs = []
    for i, st in enumerate(corpus.manifest["studies"]):
        lst = None
        if lists is not None:
            lists.mkdir(parents=True, exist_ok=True)
            lst = lists / f"{i:04d}.txt"
            lst.write_text("".join(f + "\n" for f in st["files"]))
        jobs.append((out / st["entity"] / f"{st['entity']}_{i:04d}.tar.gz", st["files"], lst))
    return jobs


def pipeline_command(input_dir: Path, out: Path, report: str = "report.json") -> list[str]:
    """The pipeline's plain command line: objects in out/bucket, rows in out/rows."""
    return [sys.executable, "-m", "pipeline", "--input", str(input_dir),
            "--bucket", str(out / "bucket"), "--collection", COLLECTION,
            "--metadata_output", str(out / "rows"), "--report", str(out / report)]


def method_command(method: str, corpus: Corpus, out: Path, work: Path) -> list[str]:
    """The command for one method; baselines get their per-study scripts here."""
    if method == "pipeline":
        return pipeline_command(corpus.input, out)
    if method == "py-tarfile":
        jobs = {"input": str(corpus.input),
                "studies": [{"out": str(a), "files": f} for a, f, _ in study_jobs(corpus, out)]}
        (work / "jobs.json").write_text(json.dumps(jobs))
        return [sys.executable, str(BENCH_DIR / "baseline_tarfile.py"), str(work / "jobs.json")]
    src = shlex.quote(str(corpus.input))
    lines = ["set -euo pipefail"]
    for archive, _, lst in study_jobs(corpus, out, work / "lists"):
        a, files = shlex.quote(str(archive)), shlex.quote(str(lst))
        lines.append(f"mkdir -p {shlex.quote(str(archive.parent))}")
        if method == "tar-gzip":
            lines.append(f"tar czf {a} -C {src} -T {files}")
        else:
            lines.append(f"tar -cf - -C {src} -T {files} | pigz -6 -p 2 > {a}")
    (work / "run.sh").write_text("\n".join(lines) + "\n")
    return ["bash", str(work / "run.sh")]


def analyze_archive(path: str) -> dict[str, int]:
    """Split a multi-member gzip file; recompress each member with zlib level 6.

    Returns the archive size, gzip member count, tar file entries (and how
    many of them are DICOM: "DICM" at offset 128, whatever their name) and the size
    gzip -6 gives for the same members (same boundaries), which isolates the
    compression level from the per-member framing cost. The single-stream
    comparison is the out/tar-gz column (tar czf is gzip -6 over one stream).
    """
    member_size = members = raw = 0
    open_member = False
    d, per_member = dzlib.decompressobj(31), zlib.compressobj(6, zlib.DEFLATED, 31)
    with open(path, "rb") as f:
        pending = b""
        while chunk := pending or f.read(1 << 18):
            pending, open_member = b"", True
            data = d.decompress(chunk)
            raw += len(data)
            member_size += len(per_member.compress(data))
            if d.eof:
                members += 1
                member_size += len(per_member.flush())
                pending, open_member = d.unused_data, False
                d, per_member = dzlib.decompressobj(31), zlib.compressobj(6, zlib.DEFLATED, 31)
    if open_member:
        raise ValueError(f"{path}: truncated gzip member")
    entries = dicom = 0
    with tarfile.open(path, "r:gz") as tar:  # not "r|gz": it stops after one gzip member
        for ti in tar:
            if ti.isfile():
                entries += 1
                dicom += tar.extractfile(ti).read(132)[128:] == b"DICM"  # type: ignore[union-attr]
    return {"bytes": os.path.getsize(path), "members": members, "tar_entries": entries,
            "dicom_entries": dicom,
            "raw": raw, "gzip6_members": member_size}


def archives(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tar.gz"))


def check_pipeline(corpus: Corpus, out: Path, ratio: bool) -> dict[str, Any]:
    """Does the output match the manifest? Plus report fields and gzip ratios."""
    found = archives(out / "bucket")
    expected: dict[str, int] = {}
    for st in corpus.manifest["studies"]:
        expected[st["entity"]] = expected.get(st["entity"], 0) + 1
    got: dict[str, int] = {}
    for a in found:
        got[a.parent.name] = got.get(a.parent.name, 0) + 1
    problems = []
    if got != expected:
        problems.append(f"archives per entity {got} != studies per entity {expected}")
    bad_place = [str(a) for a in found if a.parent.parent != out / "bucket/Collection/BENCH/Entity"]
    if bad_place:
        problems.append(f"{len(bad_place)} archives outside Collection/BENCH/Entity/<entity>/")
    checks: dict[str, Any] = {"archives": len(found), "expected_archives": len(corpus.manifest["studies"])}
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if not report:
        problems.append("no report written")
    objects = report.get("objects", [])
    checks["instances_reported"] = sum(o.get("instances", 0) for o in objects)
    if objects and checks["instances_reported"] != corpus.manifest["files"]:
        problems.append(f"report counts {checks['instances_reported']} instances, "
                        f"corpus has {corpus.manifest['files']}")
    summary = report.get("summary", {})
    bad = corpus.manifest.get("bad_files", [])  # in the input, in no study: each must be rejected
    checks["bad_files"] = len(bad)
    if report and (summary.get("rejected"), summary.get("flagged")) != (len(bad), 0):
        problems.append(f"report: {summary.get('rejected')} rejected, {summary.get('flagged')} flagged; "
                        f"the corpus has {len(bad)} bad files and nothing to flag")
    if report and summary.get("kept") != corpus.manifest["files"]:
        problems.append(f"report: {summary.get('kept')} kept, corpus has {corpus.manifest['files']} images")
    read = summary.get("input_bytes_read")
    checks["input_bytes_read"] = read
    checks["read_vs_input"] = read / corpus.manifest["bytes"] if isinstance(read, (int, float)) else None
    rows = (out / "rows").glob("rows*")  # NDJSON rows; not schema.json or dead letters
    checks["metadata_rows"] = sum(sum(1 for _ in open(p, "rb")) for p in rows if p.is_file())
    if ratio and found:
        with ProcessPoolExecutor(2) as pool:
            stats = list(pool.map(analyze_archive, map(str, found)))
        total = {k: sum(s[k] for s in stats) for k in stats[0]}
        checks |= {"gzip_members": total["members"], "tar_entries": total["tar_entries"],
                   "dicom_entries": total["dicom_entries"],
                   "vs_gzip6_members": total["bytes"] / total["gzip6_members"]}
        if total["dicom_entries"] != corpus.manifest["files"]:
            problems.append(f"archives hold {total['dicom_entries']} DICOM files, "
                            f"corpus has {corpus.manifest['files']}")
    checks["problems"] = problems
    return checks


def timed(label: str, cmd: list[str], cwd: Path, log: Path, args: argparse.Namespace) -> Measurement:
    """One measured run, with the progress line every run prints. What
    earlier runs wrote reaches the disk first (sync): a run is not charged
    for its predecessor's writeback (the first run of the rerun case wrote
    ~500 MB, flushed during the short re-run after it)."""
    os.sync()
    wait_idle(args.wait_idle)
    print(f"  {label:<11} ...", end=" ", flush=True)
    probe = cpu_probe_s()
    m = measure(cmd, cwd, log, args.timeout, args.interval)
    m.cpu_probe_s = probe
    print(f"rc={m.rc} {m.wall_s:.1f}s (probe {probe:.2f}s)" + ("" if m.rc == 0 else f"  (log: {m.log})")
          + (f"  NOISY: {m.other_cpu_s:.1f} cpu-s used by other processes" if noisy(m) else ""),
          flush=True)
    return m


def noisy(m: Measurement | dict[str, Any]) -> bool:
    """Other processes used more than 10% of a core-second per second of the run."""
    row = asdict(m) if isinstance(m, Measurement) else m
    return row["other_cpu_s"] > 0.1 * row["wall_s"]


def core_util(m: Measurement | dict[str, Any]) -> float | None:
    """CPU seconds over wall seconds x cores, in percent: 100 = every core busy."""
    row = asdict(m) if isinstance(m, Measurement) else m
    return 100 * row["cpu_s"] / (row["wall_s"] * (os.cpu_count() or 1)) if row["wall_s"] else None


def run_method(method: str, corpus: Corpus, args: argparse.Namespace,
               ratio: bool = True) -> dict[str, Any]:
    work = WORK_DIR / corpus.label / method
    shutil.rmtree(work, ignore_errors=True)
    out = work / "out"
    out.mkdir(parents=True)
    cmd = method_command(method, corpus, out, work)
    corpus.warm()
    cwd = args.pipeline_dir if method == "pipeline" else work
    m = timed(method, cmd, cwd, work / "log.txt", args)
    row: dict[str, Any] = asdict(m)
    row["output_bytes"] = sum(a.stat().st_size for a in archives(out))
    if method == "pipeline" and m.rc == 0:
        row["checks"] = check_pipeline(corpus, out, ratio and args.ratio)
    if not args.keep_outputs:
        shutil.rmtree(out / "bucket" if method == "pipeline" else out, ignore_errors=True)
    return row


def run_repeated(corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline --repeat times (it is short; the baselines run once):
    the run with the median wall time is the one reported, all walls kept."""
    runs = [run_method("pipeline", corpus, args, ratio=i == 0) for i in range(args.repeat)]
    checks = runs[0].get("checks")
    ok = sorted((r for r in runs if r["rc"] == 0), key=lambda r: r["wall_s"])
    row = ok[(len(ok) - 1) // 2] if len(ok) == len(runs) else next(r for r in runs if r["rc"] != 0)
    if checks and row.get("checks"):  # the member recompression check ran on the first
        row["checks"] = {**row["checks"], **{k: v for k, v in checks.items() if k not in row["checks"]}}
    row["runs_wall_s"] = [r["wall_s"] for r in runs]
    row["runs_cpu_probe_s"] = [r["cpu_probe_s"] for r in runs]
    return row


def derive(rows: dict[str, dict[str, Any]], corpus: Corpus) -> None:
    """Add throughput and relative columns in place."""
    base = rows.get("tar-gzip", {})
    pipe = rows.get("pipeline", {})
    for row in rows.values():
        ok = row["rc"] == 0
        row["mb_per_s"] = corpus.manifest["bytes"] / MB / row["wall_s"] if ok else None
        row["images_per_s"] = corpus.manifest["files"] / row["wall_s"] if ok else None
        row["output_vs_tar_gzip"] = (row["output_bytes"] / base["output_bytes"]
                                     if ok and base.get("rc") == 0 else None)
        row["time_vs_pipeline"] = (row["wall_s"] / pipe["wall_s"]
                                   if ok and pipe.get("rc") == 0 else None)
        row["core_util_pct"] = core_util(row)


def fmt(value: Any, spec: str) -> str:
    """format(), but None prints as a right-aligned "n/a" of the same width."""
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return f"{'n/a':>{width or 0}}" if value is None else format(value, spec)


def print_table(corpus: Corpus, rows: dict[str, dict[str, Any]]) -> None:
    man = corpus.manifest
    bad = f" (+ {len(man['bad_files'])} bad files)" if man.get("bad_files") else ""
    print(f"\n{corpus.label}: {man['files']} files{bad}, {man['bytes'] / MB:.0f} MB, "
          f"{len(man['studies'])} studies, {man['entities']} entities")
    head = ("method", "wall s", "MB/s", "img/s", "out/tar-gz", "tree RSS MB", "PSS MB",
            "proc RSS MB", "cpu s", "cores %", "t/t_pipe")
    print("{:<11} {:>8} {:>7} {:>7} {:>10} {:>11} {:>7} {:>11} {:>7} {:>7} {:>8}".format(*head))
    for name, r in rows.items():
        status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}" + (" (timeout)" if r["timed_out"] else "")
        status += "  noisy" if noisy(r) else ""
        print(f"{name:<11} {r['wall_s']:>8.1f} {fmt(r['mb_per_s'], '>7.1f')} "
              f"{fmt(r['images_per_s'], '>7.1f')} "
              f"{fmt(r['output_vs_tar_gzip'], '>10.3f')} {r['peak_tree_rss'] / MB:>11.0f} "
              f"{r['peak_tree_pss'] / MB:>7.0f} {r['max_proc_rss'] / MB:>11.0f} {r['cpu_s']:>7.1f} "
              f"{fmt(r['core_util_pct'], '>7.0f')} {fmt(r['time_vs_pipeline'], '>8.2f')}{status}")
    walls = rows.get("pipeline", {}).get("runs_wall_s", [])
    if len(walls) > 1:
        print(f"pipeline: {len(walls)} runs, " + ", ".join(f"{w:.1f}" for w in walls)
              + " s; the median run is shown")
    print("cpu probe before each run (s, lower is a faster machine phase): " + ", ".join(
        f"{name} {p:.2f}" for name, r in rows.items()
        for p in r.get("runs_cpu_probe_s", [r.get("cpu_probe_s", 0)])))
    checks = rows.get("pipeline", {}).get("checks")
    if checks:
        print(f"pipeline: input bytes read / input size = {fmt(checks['read_vs_input'], '.3f')}; "
              f"archives / gzip -6 of the same members = "
              f"{fmt(checks.get('vs_gzip6_members'), '.3f')} (target <= 1.05); "
              f"{checks['archives']}/{checks['expected_archives']} archives, "
              f"{checks.get('gzip_members', 'n/a')} gzip members, "
              f"{checks.get('dicom_entries', 'n/a')} DICOM + "
              f"{checks.get('tar_entries', 0) - checks.get('dicom_entries', 0)} other tar entries, "
              f"{checks['metadata_rows']} metadata rows"
              + (f"; {checks['bad_files']} bad files, all rejected" if checks.get("bad_files")
                 and not any("rejected" in p for p in checks["problems"]) else ""))
        for p in checks["problems"]:
            print(f"pipeline PROBLEM: {p}")


def save(key: str, value: Any) -> None:
    """Merge one section into results.json, keeping the others."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = value
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "pipeline_python": sys.executable}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def corpus_methods(name: str, args: argparse.Namespace) -> list[str]:
    """--methods if given (tiny: the pipeline only, always), else the corpus's default."""
    if name == "tiny":
        return ["pipeline"]
    methods = list(args.methods or DEFAULT_METHODS.get(name, NEW_CORPUS_METHODS))
    if "tar-pigz" in methods and not shutil.which("pigz"):
        print("  tar-pigz skipped: pigz not installed (bench/setup.sh installs it)")
        methods.remove("tar-pigz")
    return methods


def bench_corpus(name: str, args: argparse.Namespace) -> None:
    scale = 1.0 if name == "tiny" else args.scale  # tiny is the fixed cost: never scaled
    corpus = get_corpus(name, scale, args.corpus_python)
    methods = corpus_methods(name, args)
    print(f"{corpus.label}: {corpus.root}", flush=True)
    rows = {m: run_method(m, corpus, args) if m != "pipeline" else
            run_repeated(corpus, args) for m in methods}
    derive(rows, corpus)
    print_table(corpus, rows)
    result = {"corpus": corpus.label, "scale": scale, "files": corpus.manifest["files"],
              "bad_files": len(corpus.manifest.get("bad_files", [])),
              "input_bytes": corpus.manifest["bytes"], "studies": len(corpus.manifest["studies"]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "methods": rows}
    if name == "tiny":
        pipe = rows["pipeline"]
        met = pipe["rc"] == 0 and pipe["wall_s"] <= TINY_TARGET_S
        print(f"tiny: start-to-exit wall time of a whole run {pipe['wall_s']:.2f} s (median of "
              f"{len(pipe['runs_wall_s'])}: " + ", ".join(f"{w:.2f}" for w in pipe["runs_wall_s"])
              + f" s); target <= {TINY_TARGET_S} s: {'met' if met else 'NOT met'}")
        result |= {"target_wall_s": TINY_TARGET_S, "target_met": met}
    save(name, result)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def read_rows(rows_dir: Path) -> list[dict[str, Any]]:
    """Every row of a local metadata folder (rows-*.json, newline-delimited)."""
    rows = []
    for path in sorted(rows_dir.glob("rows-*.json")):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def link_tree(src: Path, dest: Path) -> None:
    """Copy a folder as hard links (a copy when the file system refuses).
    Not symbolic links: the pipeline does not follow a link that leaves its
    input root."""
    for dirpath, _, files in os.walk(src):
        target = dest / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(dirpath) / name, target / name)
            except OSError:
                shutil.copy2(Path(dirpath) / name, target / name)


def warm_files(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def case_row(m: Measurement, **extra: Any) -> dict[str, Any]:
    """A measurement as saved by the cases: the run plus its derived numbers."""
    return asdict(m) | {"core_util_pct": core_util(m), "noisy": noisy(m)} | extra


def print_case_table(title: str, rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """A case's table: wall, cpu, cores % and the case's own columns
    (header, row key, format); None prints as n/a."""
    print(f"\n{title}")
    label_width = max(len(k) for k in rows) + 1
    head = ["wall s", "cpu s", "cores %"] + [h for h, _, _ in columns]
    widths = [max(len(h), 8) for h in head]
    print(f"{'':<{label_width}} " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for label, r in rows.items():
        values = [fmt(r.get("wall_s"), f">{widths[0]}.2f"), fmt(r.get("cpu_s"), f">{widths[1]}.1f"),
                  fmt(r.get("core_util_pct"), f">{widths[2]}.0f")]
        values += [fmt(r.get(key), f">{w}{spec}") for (_, key, spec), w in zip(columns, widths[3:], strict=True)]
        status = "" if r.get("rc") == 0 else f"  FAILED rc={r.get('rc')} (log: {r.get('log')})"
        status += "  noisy" if r.get("noisy") else ""
        print(f"{label:<{label_width}} " + " ".join(values) + status)


STORED: dict[tuple[str, float], tuple[Corpus, Path]] = {}


def stored_run(name: str, scale: float, args: argparse.Namespace) -> tuple[Corpus, Path] | None:
    """A pipeline run of a corpus kept on disk (objects, rows, report) for the
    export and verify cases: made once per invocation, None if it failed."""
    if (name, scale) not in STORED:
        corpus = get_corpus(name, scale, args.corpus_python)
        work = WORK_DIR / corpus.label / "stored"
        shutil.rmtree(work, ignore_errors=True)
        out = work / "out"
        corpus.warm()
        m = timed("stored run", pipeline_command(corpus.input, out), args.pipeline_dir,
                  work / "log.txt", args)
        if m.rc != 0:
            print(f"  the stored run of {corpus.label} failed: its cases are skipped")
            return None
        STORED[name, scale] = corpus, out
    return STORED[name, scale]


def drop_stored_runs(args: argparse.Namespace) -> None:
    if not args.keep_outputs:
        for corpus, out in STORED.values():
            shutil.rmtree(out.parent, ignore_errors=True)
    STORED.clear()


def bench_rerun(args: argparse.Namespace) -> None:
    """small-8000 stored, then re-run unchanged, then re-run with one new entity
    (small-8000-extra) added to a copy of the input."""
    corpus = get_corpus("small-8000", args.scale, args.corpus_python)
    extra = get_corpus("small-8000-extra", 1.0, args.corpus_python)
    print(f"rerun: {corpus.label}: {corpus.root}; new entity from {extra.root}", flush=True)
    work = WORK_DIR / "rerun"
    shutil.rmtree(work, ignore_errors=True)
    # A copy of the input (hard links), so that the new entity is added to it and
    # not to the cached corpus; every run reads this same root.
    input_dir = work / "input"
    link_tree(corpus.input, input_dir)
    out = work / "out"
    runs: dict[str, dict[str, Any]] = {}
    steps = (("first run", "first"), ("unchanged re-run", "unchanged"),
             ("re-run + 1 new entity", "new_entity"))
    for n, (label, key) in enumerate(steps, 1):
        if key == "new_entity":
            link_tree(extra.input, input_dir)  # its one entity folder lands beside the others
        corpus.warm()
        extra.warm()
        m = timed(key, pipeline_command(input_dir, out, f"report-{n}.json"), args.pipeline_dir,
                  work / f"log-{n}.txt", args)
        summary = read_json(out / f"report-{n}.json").get("summary", {})
        runs[label] = case_row(m, summary=summary, **{k: summary.get(k) for k in (
            "input_bytes_read", "objects", "objects_rows_completed", "studies_skipped", "kept")})
        runs[label]["input_mb_read"] = (summary["input_bytes_read"] / MB
                                        if isinstance(summary.get("input_bytes_read"), int) else None)
        if m.rc != 0:
            break
    first = runs["first run"]
    for r in runs.values():
        r["vs_first_pct"] = 100 * r["wall_s"] / first["wall_s"] if first["rc"] == 0 and r["rc"] == 0 else None
    studies, new_studies = len(corpus.manifest["studies"]), len(extra.manifest["studies"])
    problems = []
    expect = {"first run": (studies, 0), "unchanged re-run": (0, studies),
              "re-run + 1 new entity": (new_studies, studies)}
    for label, r in runs.items():
        if r["rc"] == 0 and (r.get("objects"), r.get("studies_skipped")) != expect[label]:
            problems.append(f"{label}: {r.get('objects')} objects written, {r.get('studies_skipped')} "
                            f"studies skipped; expected {expect[label][0]} and {expect[label][1]}")
    print_case_table(
        f"rerun: {corpus.label} ({corpus.manifest['files']} images, {studies} studies, "
        f"{corpus.manifest['entities']} entities); new entity: {extra.manifest['files']} images, "
        f"{new_studies} studies, {extra.manifest['bytes'] / MB:.1f} MB",
        runs, [("vs first %", "vs_first_pct", ".1f"), ("input MB read", "input_mb_read", ".1f"),
               ("objects", "objects", "d"), ("skipped", "studies_skipped", "d")])
    unchanged, added = runs.get("unchanged re-run", {}), runs.get("re-run + 1 new entity", {})
    share = unchanged.get("vs_first_pct")
    read = added.get("input_bytes_read")
    read_ratio = read / extra.manifest["bytes"] if isinstance(read, int) else None
    share_met = share is not None and share <= 100 * RERUN_TARGET
    print(f"unchanged re-run: {fmt(share, '.1f')}% of the first run's wall time "
          f"(target <= {100 * RERUN_TARGET:.0f}%: {'met' if share_met else 'NOT met'})")
    print(f"re-run + 1 new entity: input bytes read {fmt(read and read / MB, '.1f')} MB / the new "
          f"entity's {extra.manifest['bytes'] / MB:.1f} MB = {fmt(read_ratio, '.2f')} "
          f"(1.0: only the new entity read); objects written {added.get('objects', 'n/a')} / "
          f"{new_studies} new studies")
    for p in problems:
        print(f"rerun PROBLEM: {p}")
    save("rerun", {"corpus": corpus.label, "scale": args.scale, "files": corpus.manifest["files"],
                   "studies": studies, "input_bytes": corpus.manifest["bytes"],
                   "new_entity": {"corpus": extra.label, "files": extra.manifest["files"],
                                  "studies": new_studies, "bytes": extra.manifest["bytes"]},
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "unchanged_share_of_first": share and share / 100,
                   "unchanged_target": RERUN_TARGET, "unchanged_target_met": share_met,
                   "new_entity_read_vs_its_bytes": read_ratio,
                   "new_entity_objects_written": added.get("objects"),
                   "new_entity_studies": new_studies, "problems": problems, "runs": runs})
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)


EXPORT_SUMMARY = re.compile(
    r"Exported ([\d,]+) images to .*?: ([\d,]+) written, ([\d,]+) already there.*?"
    r"read ([\d,.]+) MB in ([\d,]+) requests for ([\d,.]+) MB of images compressed")


def export_summary(log: str) -> dict[str, Any]:
    """The numbers of pipeline.export's summary line (its MB are rounded:
    0.1 MB under 10 MB, 1 MB from there)."""
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    found = EXPORT_SUMMARY.search(text)
    if not found:
        return {}
    n = [float(g.replace(",", "")) for g in found.groups()]
    return {"images": int(n[0]), "written": int(n[1]), "already_there": int(n[2]),
            "read_bytes": n[3] * MB, "requests": int(n[4]), "member_bytes": n[5] * MB}


def rounding_of(n_bytes: float) -> float:
    """Half the step pipeline.console.megabytes rounds to."""
    return 0.5 * MB if n_bytes >= 10 * MB else 0.05 * MB


def pick_cohort(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n images spread over as many studies as possible: studies evenly spaced
    in object order, the middle image of each (then the images around it)."""
    by_object: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_object.setdefault(row["storage"]["uri"], []).append(row)
    objects = []
    for _, images in sorted(by_object.items()):
        images.sort(key=lambda r: r["storage"]["member_offset"])
        mid = len(images) // 2  # the middle image first, then outwards
        objects.append([r for _, r in sorted(enumerate(images), key=lambda ir: (abs(ir[0] - mid), ir[0]))])
    if len(objects) > n:
        objects = [objects[(i * len(objects)) // n] for i in range(n)]
    picks: list[dict[str, Any]] = []
    depth = 0
    while len(picks) < n and any(depth < len(images) for images in objects):
        picks += [images[depth] for images in objects if depth < len(images)][:n - len(picks)]
        depth += 1
    return picks


def bench_export(args: argparse.Namespace) -> None:
    """On a stored run: the largest study exported whole, against tar xzf of
    its object; a cohort of a few images over many studies: bytes read for
    the selected members' bytes."""
    stored = stored_run(args.stored_corpus, args.scale, args)
    if stored is None:
        return
    corpus, out = stored
    work = WORK_DIR / corpus.label / "export"
    shutil.rmtree(work, ignore_errors=True)
    report = read_json(out / "report.json")
    rows = read_rows(out / "rows")
    largest = max(report["studies"], key=lambda st: st["input_bytes"])
    obj = Path(largest["uri"])
    study_rows = [r for r in rows if r["storage"]["uri"] == largest["uri"]]
    image_bytes = sum(r["storage"]["member_size_bytes"] for r in study_rows)
    export_base = [sys.executable, "-m", "pipeline.export", "--metadata_output", str(out / "rows")]
    results: dict[str, dict[str, Any]] = {}

    warm_files([obj])
    m = timed("export", export_base + ["--where", f"study_instance_uid = '{largest['study_instance_uid']}'",
                                       "--out", str(work / "study")], args.pipeline_dir,
              work / "log-study.txt", args)
    got = export_summary(m.log)
    results["export largest study"] = case_row(m, images=got.get("written"), export=got)
    warm_files([obj])
    (work / "tar").mkdir(parents=True)
    m = timed("tar xzf", ["tar", "xzf", str(obj), "-C", str(work / "tar")], work, work / "log-tar.txt", args)
    extracted = sum(1 for p in (work / "tar").rglob("*") if p.is_file() and p.name != "manifest.json")
    results["tar xzf its object"] = case_row(m, images=extracted)
    for r in results.values():
        r["image_mb_per_s"] = image_bytes / MB / r["wall_s"] if r["rc"] == 0 else None
    tar_row, exp_row = results["tar xzf its object"], results["export largest study"]
    ratio = (exp_row["wall_s"] / tar_row["wall_s"]) if exp_row["rc"] == tar_row["rc"] == 0 else None
    exp_row["vs_tar"] = ratio

    cohort = pick_cohort(rows, args.cohort)
    expected = sum(r["storage"]["member_length"] for r in cohort)
    uids = ", ".join(f"'{r['sop_instance_uid']}'" for r in cohort)
    warm_files(sorted({Path(r["storage"]["uri"]) for r in cohort}))
    m = timed("cohort", export_base + ["--where", f"sop_instance_uid IN ({uids})", "--out", str(work / "cohort")],
              args.pipeline_dir, work / "log-cohort.txt", args)
    got = export_summary(m.log)
    cohort_studies = len({r["storage"]["uri"] for r in cohort})
    read_ratio = got["read_bytes"] / expected if got and expected else None
    results[f"cohort ({len(cohort)} images, {cohort_studies} studies)"] = case_row(
        m, images=got.get("written"), export=got, selected_member_bytes=expected,
        read_vs_selected=read_ratio)

    problems = []
    if exp_row["rc"] == 0 and exp_row["images"] != len(study_rows):
        problems.append(f"export wrote {exp_row['images']} images of the study's {len(study_rows)}")
    if tar_row["rc"] == 0 and extracted != len(study_rows):
        problems.append(f"tar extracted {extracted} images of the study's {len(study_rows)}")
    if got and got["written"] != len(cohort):
        problems.append(f"cohort: {got['written']} images written of {len(cohort)}")
    print_case_table(
        f"export: stored run of {corpus.label}; largest study {largest['study_instance_uid']}: "
        f"{len(study_rows)} images, {image_bytes / MB:.1f} MB of images, object {obj.stat().st_size / MB:.1f} MB",
        results, [("images", "images", "d"), ("image MB/s", "image_mb_per_s", ".1f"),
                  ("t/t_tar", "vs_tar", ".2f")])
    print(f"export of the largest study: {fmt(ratio, '.2f')} x the time of tar xzf of its object "
          f"(target <= 1: {'met' if ratio is not None and ratio <= 1 else 'NOT met'})")
    if got:
        slack = rounding_of(got["read_bytes"]) / expected
        print(f"cohort: read {got['read_bytes'] / MB:.1f} MB in {got['requests']} requests for the "
              f"{len(cohort)} selected members' {expected / MB:.3f} MB compressed (rows' member_length) "
              f"= {read_ratio:.2f} (+-{slack:.2f}: the export's summary rounds its MB; target ~1)")
    else:
        print("cohort: no summary line in the export's log")
    for p in problems:
        print(f"export PROBLEM: {p}")
    save("export", {"corpus": corpus.label, "scale": args.scale,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "study": {"study_instance_uid": largest["study_instance_uid"], "images": len(study_rows),
                              "image_bytes": image_bytes, "object_bytes": obj.stat().st_size},
                    "export_vs_tar_xzf": ratio,
                    "cohort": {"images": len(cohort), "studies": cohort_studies,
                               "selected_member_bytes": expected, "read_vs_selected": read_ratio},
                    "problems": problems, "runs": results})
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)


def verify_runs(where: str, bucket: str, rows_args: list[str], work: Path, args: argparse.Namespace,
                objects: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """pipeline.verify without and with --read_data; with `objects` (a local
    bucket), the same objects read whole by cat, for comparison."""
    runs: dict[str, dict[str, Any]] = {}
    for key, extra in (("verify", []), ("verify --read_data", ["--read_data"])):
        name = key.replace(" --", "-")
        if objects:
            warm_files(objects)
        m = timed(name, [sys.executable, "-m", "pipeline.verify", "--bucket", bucket, "--collection",
                         COLLECTION, *rows_args, *extra, "--report", str(work / name / "verify.json")],
                  args.pipeline_dir, work / f"log-{name}.txt", args)
        summary = read_json(work / name / "verify.json").get("summary", {})
        row = case_row(m, summary=summary, objects_checked=summary.get("objects_checked"),
                       problems=summary.get("problems"))
        ok = m.rc == 0 and summary
        row["objects_per_s"] = summary["objects_checked"] / m.wall_s if ok else None
        row["read_mb_per_s"] = summary["bytes_read"] / MB / m.wall_s if ok else None
        row["read_mb"] = summary["bytes_read"] / MB if summary else None
        runs[f"{where}: {key}"] = row
    if objects:
        warm_files(objects)
        m = timed("cat", ["bash", "-c", 'cat -- "$@" > /dev/null', "cat", *map(str, objects)],
                  work, work / "log-cat.txt", args)
        total = sum(p.stat().st_size for p in objects)
        runs[f"{where}: cat objects"] = case_row(
            m, objects_checked=len(objects), read_mb=total / MB,
            objects_per_s=len(objects) / m.wall_s if m.rc == 0 else None,
            read_mb_per_s=total / MB / m.wall_s if m.rc == 0 else None)
    return runs


def emulator_verify(corpus: Corpus, work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The pipeline run against the Cloud Storage and BigQuery emulators
    (devtools/emulators.py, reached by STORAGE_EMULATOR_HOST and
    BIGQUERY_EMULATOR_HOST as clients are), then verify on them."""
    sys.path.insert(0, str(REPO_DIR))   # the bench's own emulator helpers
    try:
        from devtools.emulators import (bigquery_emulator, clients_reach,
                                        create_bucket, gcs_emulator)
    finally:
        sys.path.pop(0)
    gcs_root = work / "gcs"
    gcs_root.mkdir(parents=True)
    runs: dict[str, dict[str, Any]] = {}
    with gcs_emulator(root=gcs_root) as gcs_url, \
            bigquery_emulator(EMULATOR_PROJECT, gcs_root=gcs_root) as bq_url, \
            clients_reach(gcs_url, bq_url):
        create_bucket(gcs_url, "bench")
        corpus.warm()
        m = timed("pipeline", [sys.executable, "-m", "pipeline", "--input", str(corpus.input),
                               "--bucket", "gs://bench", "--collection", COLLECTION,
                               "--bigquery_project", EMULATOR_PROJECT,
                               "--report", str(work / "run" / "report.json")],
                  args.pipeline_dir, work / "log-pipeline.txt", args)
        summary = read_json(work / "run" / "report.json").get("summary", {})
        runs["emulators: pipeline run"] = case_row(m, summary=summary, objects_checked=summary.get("objects"))
        if m.rc == 0:
            runs |= verify_runs("emulators", "gs://bench", ["--bigquery_project", EMULATOR_PROJECT],
                                work, args)
    return runs


def bench_verify(args: argparse.Namespace) -> None:
    """pipeline.verify on the stored run (local bucket), and on a small corpus
    both locally and on the emulators: objects checked per second, and with
    --read_data MB read per second against reading the objects whole."""
    results: dict[str, dict[str, Any]] = {}
    stored = stored_run(args.stored_corpus, args.scale, args)
    if stored is None:
        return
    corpus, out = stored
    objects = sorted((out / "bucket").rglob("*.tar.gz"))
    work = WORK_DIR / corpus.label / "verify"
    shutil.rmtree(work, ignore_errors=True)
    results |= verify_runs(f"{corpus.label}, local", str(out / "bucket"),
                           ["--metadata_output", str(out / "rows")], work, args, objects)
    cloud = None
    if args.cloud:
        small_scale = round(0.1 * args.scale, 6)
        stored_small = stored_run("small-8000", small_scale, args)
        if stored_small is not None:
            cloud, small_out = stored_small
            small_work = WORK_DIR / cloud.label / "verify"
            shutil.rmtree(small_work, ignore_errors=True)
            results |= verify_runs(f"{cloud.label}, local", str(small_out / "bucket"),
                                   ["--metadata_output", str(small_out / "rows")], small_work / "local", args)
            try:
                results |= emulator_verify(cloud, small_work / "emulators", args)
            except Exception as e:  # pylint: disable=broad-except  # emulators missing or failing to start
                print(f"  emulators: skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                results["emulators: skipped"] = {"rc": None, "error": f"{type(e).__name__}: {e}"[:2000]}
            if not args.keep_outputs:
                shutil.rmtree(small_work, ignore_errors=True)
    shown = {k: v for k, v in results.items() if "wall_s" in v}
    print_case_table(
        f"verify: stored run of {corpus.label} ({len(objects)} objects, "
        f"{sum(p.stat().st_size for p in objects) / MB:.0f} MB), local bucket"
        + (f"; {cloud.label} locally and on the emulators" if cloud else ""),
        shown, [("objects", "objects_checked", "d"), ("objects/s", "objects_per_s", ".1f"),
                ("MB read", "read_mb", ".1f"), ("MB/s read", "read_mb_per_s", ".1f")])
    for label, r in results.items():
        if r.get("problems"):
            print(f"verify PROBLEM: {label}: {r['problems']} problems (see {r.get('log')})")
    save("verify", {"corpus": corpus.label, "scale": args.scale, "objects": len(objects),
                    "object_bytes": sum(p.stat().st_size for p in objects),
                    "emulator_corpus": cloud.label if cloud else None,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": results})
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)


def bench_memory(args: argparse.Namespace) -> None:
    """Pipeline only, one study of growing size: peak memory should stay flat."""
    rows = {}
    for size in args.memory_sizes:
        corpus = get_corpus(f"mem-{size}", args.scale, args.corpus_python)
        print(f"{corpus.label}: {corpus.root}", flush=True)
        row = run_method("pipeline", corpus, args, ratio=False)
        row |= {"input_bytes": corpus.manifest["bytes"], "files": corpus.manifest["files"]}
        rows[corpus.label] = row
    print(f"\nmemory: one study per run; goal: flat peak tree RSS under {RSS_GOAL / MB:.0f} MB")
    print("{:<14} {:>8} {:>6} {:>8} {:>7} {:>11} {:>7} {:>11}  {}".format(
        "corpus", "input MB", "files", "wall s", "MB/s", "tree RSS MB", "PSS MB", "proc RSS MB", "status"))
    for label, r in rows.items():
        problems = r.get("checks", {}).get("problems", [])
        status = ("FAILED" if r["rc"] != 0 else "over goal" if r["peak_tree_rss"] > RSS_GOAL
                  else "output problem" if problems else "ok")
        status += ", noisy" if r["other_cpu_s"] > 0.1 * r["wall_s"] else ""
        print(f"{label:<14} {r['input_bytes'] / MB:>8.0f} {r['files']:>6} {r['wall_s']:>8.1f} "
              f"{r['input_bytes'] / MB / r['wall_s']:>7.1f} {r['peak_tree_rss'] / MB:>11.0f} "
              f"{r['peak_tree_pss'] / MB:>7.0f} {r['max_proc_rss'] / MB:>11.0f}  {status}")
        for p in problems:
            print(f"  PROBLEM: {p}")
    ok = [r for r in rows.values() if r["rc"] == 0]
    if len(ok) >= 2:
        slope = ((ok[-1]["peak_tree_rss"] - ok[0]["peak_tree_rss"])
                 / (ok[-1]["input_bytes"] - ok[0]["input_bytes"]) * 1000)
        print(f"growth: {slope:.1f} MB of peak tree RSS per GB of study (flat = ~0)")
    save("memory", {"scale": args.scale, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="memory mode (pipeline only)")
    parser.add_argument("--scale", type=float, default=None,
                        help="corpus size knob, e.g. 0.05 (default 1; tiny is never scaled)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --scale 0.05 and --repeat 1 unless given")
    parser.add_argument("--corpora", nargs="*", default=list(CORPUS_NAMES), choices=CORPUS_NAMES,
                        help="corpora to time the methods on (default: all; none: only --cases)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES,
                        help="rerun (small-8000), export and verify (on a stored run of "
                             "--stored-corpus) (default: all; none: only --corpora)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="methods for every corpus but tiny (default: all four on large and "
                             "small-files, no py-tarfile on mixed and small-8000)")
    parser.add_argument("--stored-corpus", default="large", choices=["large", "mixed", "small-files",
                                                                      "small-8000"],
                        help="corpus of the stored run the export and verify cases use")
    parser.add_argument("--cohort", type=int, default=5, help="export case: images in the cohort")
    parser.add_argument("--no-cloud", dest="cloud", action="store_false",
                        help="verify case: skip the run on the Cloud Storage and BigQuery emulators")
    parser.add_argument("--memory-sizes", nargs="+", default=["0.25", "0.5", "1", "2"],
                        choices=["0.25", "0.5", "1", "2"])
    parser.add_argument("--pipeline-dir", type=Path, default=REPO_DIR,
                        help="cwd for `python -m pipeline` (default: the repo)")
    parser.add_argument("--corpus-python", default=os.environ.get(
        "BENCH_PYTHON", str(BENCH_DIR / ".venv/bin/python")),
        help="interpreter with pydicom-data for corpus.py (env BENCH_PYTHON)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each run, wait up to S seconds for an idle machine")
    parser.add_argument("--repeat", type=int, default=None,
                        help="pipeline runs per corpus; the median is reported (default 3)")
    parser.add_argument("--interval", type=float, default=None,
                        help="memory sampling period, s (default 0.2; 0.05 in memory mode, where "
                             "the peak to catch is short: the archive writer's first images)")
    parser.add_argument("--no-ratio", dest="ratio", action="store_false",
                        help="skip the gzip -6 recompression check of the pipeline's archives")
    parser.add_argument("--keep-outputs", action="store_true", help="keep archives in bench/.work")
    args = parser.parse_args()
    if args.scale is None:
        args.scale = 0.05 if args.quick else 1.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.interval is None:
        args.interval = 0.05 if args.memory else 0.2
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # keep progress in order with corpus.py's
    if not (args.pipeline_dir / "pipeline").exists():
        print(f"note: no pipeline package in {args.pipeline_dir}", file=sys.stderr)
    if args.memory:
        bench_memory(args)
    else:
        started = time.monotonic()
        for name in args.corpora:
            bench_corpus(name, args)
        cases = {"rerun": bench_rerun, "export": bench_export, "verify": bench_verify}
        try:
            for name in args.cases:
                print(f"\n{name}:", flush=True)
                cases[name](args)
        finally:
            drop_stored_runs(args)
        print(f"\nbench: {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
