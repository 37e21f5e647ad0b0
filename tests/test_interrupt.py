"""Interrupted work: `kill -9` at any point leaves each artifact absent or complete, never half written
(`atomic_dir`: a temporary sibling, then one rename), and a rerun picks up the finished stages by
content hash instead of redoing them."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from pipeline.common import atomic_dir, read_json, remove_dir, versions

from .leftovers import leftovers

REPO = Path(__file__).resolve().parents[1]
N_FILES = 40  # files one atomic write puts in its directory


def env_for(tmp_path: Path) -> dict:
    """The commands' folders under `tmp_path`, their temporary folders too (a killed process leaves its own)."""
    return {**os.environ, "PREROUTER_DATA_DIR": str(tmp_path / "data"), "PREROUTER_MODELS_DIR": str(tmp_path / "models"),
            "PREROUTER_MLRUNS_DIR": str(tmp_path / "mlruns"), "COLUMNS": "300", "PYTHONPATH": str(REPO),
            "TMPDIR": str(tmp_path)}


hidden = leftovers


def kill_after(cmd: list[str], env: dict, delay: float | None = None, when=None, poll: float = 0.002) -> int | None:
    """Start `cmd`, SIGKILL it after `delay` seconds or as soon as `when()` is true; returns its exit code
    if it finished first, else None."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None:
        if (delay is not None and time.monotonic() - start >= delay) or (when is not None and when()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(poll)
    return proc.returncode


def kill_while_writing(cmd: list[str], env: dict, writing, written: Path, tries: int = 5) -> int | None:
    """`kill_after(cmd, when=writing)`, started again (after removing `written`) when the command finished its
    write before this process saw it start: a short write on a busy machine can fall between two polls."""
    for _ in range(tries):
        code = kill_after(cmd, env, when=writing)
        if code is None or not written.exists():
            return code
        shutil.rmtree(written)
    return code


# --- atomic_dir -----------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.common import atomic_dir

    final, version = Path(sys.argv[1]), sys.argv[2]
    with atomic_dir(final) as tmp:
        for i in range({n}):
            (tmp / f"part{{i:02d}}").write_text(version * 1000)
            if i == {n} // 2:
                print("half", flush=True)
            time.sleep(0.005)
""").format(n=N_FILES)


def write_version(final: Path, version: str) -> None:
    """One whole version through atomic_dir: N_FILES files, each `version` repeated 1000 times."""
    with atomic_dir(final) as tmp:
        for i in range(N_FILES):
            (tmp / f"part{i:02d}").write_text(version * 1000)


def written_version(final: Path) -> str | None:
    """The version a complete directory holds; None when absent; fails when it is partial or mixed.
    Resolves the name once, as a reader of several files of one version must."""
    final = final.resolve()
    if not final.exists():
        return None
    files = sorted(final.iterdir())
    assert [f.name for f in files] == [f"part{i:02d}" for i in range(N_FILES)], "partial directory"
    versions = {f.read_text() for f in files}
    assert len(versions) == 1 and len(next(iter(versions))) == 1000, "mixed or truncated files"
    return next(iter(versions))[0]


def test_atomic_dir_on_an_exception_keeps_the_old_version_and_no_temporary(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "part00").write_text("half")
            raise RuntimeError("crash while writing")
    assert not final.exists() and hidden(tmp_path) == []
    write_version(final, "a")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "part00").write_text("b" * 1000)
            raise KeyboardInterrupt
    assert written_version(final) == "a" and hidden(tmp_path) == []


def test_atomic_dir_killed_mid_write_leaves_absent_or_complete_and_the_next_write_cleans_up(tmp_path):
    final = tmp_path / "artifact"
    writer = [sys.executable, "-c", WRITER, str(final)]
    env = env_for(tmp_path)

    # Killed once half the files are written: nothing there yet, a stale temporary beside it.
    proc = subprocess.Popen(writer + ["a"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half"
    proc.kill()
    proc.wait()
    assert written_version(final) is None and hidden(tmp_path) == [".artifact.lock", hidden(tmp_path)[1]]
    assert hidden(tmp_path)[1].startswith(".artifact.tmp-")  # and the lock file, which its holder removes

    # The next write removes it and leaves a complete version.
    assert subprocess.run(writer + ["a"], env=env).returncode == 0
    assert written_version(final) == "a" and hidden(tmp_path) == []

    # Killed while replacing version a with b, at random points: always a complete version, never absent.
    rng = random.Random()
    for version in "bcdef":
        code = kill_after(writer + [version], env, delay=rng.uniform(0.05, 0.6))
        assert written_version(final) in {"a", "b", "c", "d", "e", "f"}
        if code is not None:
            assert code == 0 and written_version(final) == version
    assert subprocess.run(writer + ["g"], env=env).returncode == 0
    assert written_version(final) == "g" and hidden(tmp_path) == []


KILLED_AT_RENAME = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pipeline.common import atomic_dir

    final, version, target, when = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    real, calls = os.replace, []

    def replace(src, dst):  # the process dies just before or just after rename number `target`
        calls.append(1)
        if len(calls) == target and when == "before":
            os._exit(9)
        real(src, dst)
        if len(calls) == target and when == "after":
            os._exit(9)

    os.replace = replace
    with atomic_dir(final) as tmp:
        for i in range({n}):
            (tmp / f"part{{i:02d}}").write_text(version * 1000)
""").format(n=N_FILES)

FAILING_WRITER = WRITER.replace('print("half", flush=True)', 'raise RuntimeError("crash while writing")')


@pytest.mark.parametrize("target, when, left", [(1, "before", "a"), (1, "after", "a"), (2, "before", "a"),
                                                (2, "after", "b")])
def test_atomic_dir_killed_at_each_rename_is_recovered_by_the_next_writer(tmp_path, target, when, left):
    """A write is two renames (temporary -> version folder, new link -> final). A kill at any point leaves
    the old version or the new one at `final`, never nothing; the next writer, even one that then fails,
    cleans up what the killed one left and keeps the version `final` names."""
    final, env = tmp_path / "artifact", env_for(tmp_path)
    assert subprocess.run([sys.executable, "-c", WRITER, str(final), "a"], env=env).returncode == 0
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_RENAME, str(final), "b", str(target), when], env=env)
    assert killed.returncode == 9
    assert written_version(final) == left  # a reader sees the old or the new version whole, or nothing
    assert hidden(tmp_path)  # what the killed writer left: its temporary or the old version

    failing = subprocess.run([sys.executable, "-c", FAILING_WRITER, str(final), "c"], env=env, capture_output=True)
    assert failing.returncode == 1 and b"crash while writing" in failing.stderr
    assert written_version(final) == left and hidden(tmp_path) == []  # kept, not deleted

    assert subprocess.run([sys.executable, "-c", WRITER, str(final), "d"], env=env).returncode == 0
    assert written_version(final) == "d" and hidden(tmp_path) == []


@pytest.mark.parametrize("aside", [".artifact.tmp-old", ".artifact.old-123-abcdefgh"])
def test_atomic_dir_restores_a_version_left_aside_by_an_older_writer(tmp_path, aside):
    """Writers before versioned names swapped plain folders in two renames and, killed between them, left
    the old folder aside (`.NAME.tmp-old`, later `.NAME.old-*`) and nothing at `final`: put back."""
    final = tmp_path / "artifact"
    (tmp_path / aside).mkdir()
    for i in range(N_FILES):
        (tmp_path / aside / f"part{i:02d}").write_text("a" * 1000)
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("crash while writing")
    assert written_version(final) == "a" and hidden(tmp_path) == []


def test_atomic_dir_takes_over_a_plain_folder_and_keeps_two_versions(tmp_path):
    """A `final` written as a plain folder (before versioned names) becomes the version before the first new
    one; from then on the name is a link and only the version it names and the one before stay on disk."""
    final = tmp_path / "artifact"
    final.mkdir()
    for i in range(N_FILES):
        (final / f"part{i:02d}").write_text("a" * 1000)
    for version in "bcd":
        write_version(final, version)
        kept = versions(final)
        assert final.is_symlink() and len(kept) == 2 and kept[-1] == final.resolve()
        if version == "b":
            assert written_version(kept[0]) == "a"  # the plain folder, kept for readers one more write
    assert written_version(final) == "d" and written_version(kept[0]) == "c"
    assert hidden(tmp_path) == []
    remove_dir(final)
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_resolved_the_name_reads_one_whole_version_across_a_swap(tmp_path):
    final = tmp_path / "artifact"
    for version in "ab":
        write_version(final, version)
    pinned = final.resolve()
    write_version(final, "c")
    assert written_version(pinned) == "b" and written_version(final) == "c"


def test_a_version_a_killed_writer_never_swapped_in_does_not_push_out_the_one_readers_resolved(tmp_path):
    final = tmp_path / "artifact"
    for version in "ab":
        write_version(final, version)
    pinned = final.resolve()
    orphan = tmp_path / f".artifact.v-{time.time_ns()}-999999"  # finished, killed before its swap
    orphan.mkdir()
    (orphan / "part00").write_text("x" * 1000)
    write_version(final, "d")
    assert written_version(pinned) == "b" and written_version(final) == "d"
    assert versions(final) == [pinned, final.resolve()] and hidden(tmp_path) == []


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.common import atomic_dir

    final, version, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    with atomic_dir(final) as tmp:
        with open(log, "a") as f:
            f.write(f"start {{version}} {{time.time()}}\\n")
        print("writing", flush=True)
        sys.stdin.readline()  # holds the name until the test lets it go
        for i in range({n}):
            (tmp / f"part{{i:02d}}").write_text(version * 1000)
            time.sleep(0.01)
        with open(log, "a") as f:
            f.write(f"end {{version}} {{time.time()}}\\n")
""").format(n=N_FILES)


def test_atomic_dir_concurrent_writers_of_one_name_take_turns(tmp_path):
    """Two processes write one name at once: the second waits for the first (a lock per name) instead of
    deleting its temporary directory as stale; both succeed, the last one's version is left, whole."""
    final, log, env = tmp_path / "artifact", tmp_path / "log.txt", env_for(tmp_path)

    def writer(version: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(final), version, str(log)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = writer("a")
    assert first.stdout.readline().strip() == "writing"  # the first is inside its write
    second = writer("b")
    second.stdin.write("\n")
    second.stdin.flush()
    said = [second.stderr.readline()]  # the second says it waits, and only then the first goes on
    while said[-1] and "waiting for another writer" not in said[-1]:
        said.append(second.stderr.readline())
    assert "waiting for another writer" in said[-1], said
    first.stdin.write("\n")
    first.stdin.flush()
    seen = set()
    while second.poll() is None or first.poll() is None:  # a reader meanwhile: a whole version or nothing
        seen.add(written_version(final))
        time.sleep(0.005)
    assert (first.wait(), second.wait()) == (0, 0), (first.stderr.read(), second.stderr.read())
    events = [line.split() for line in log.read_text().splitlines()]
    assert [(e[0], e[1]) for e in events] == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    assert written_version(final) == "b" and hidden(tmp_path) == [] and seen <= {None, "a", "b"}


def test_atomic_dir_threads_take_turns_and_one_thread_cannot_nest_one_name(tmp_path):
    import threading

    final, order = tmp_path / "artifact", []

    def write(version: str) -> None:
        with atomic_dir(final) as tmp:
            order.append(f"start {version}")
            for i in range(N_FILES):
                (tmp / f"part{i:02d}").write_text(version * 1000)
                time.sleep(0.001)
            order.append(f"end {version}")

    threads = [threading.Thread(target=write, args=(v,)) for v in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(order[i].split()[1] == order[i + 1].split()[1] for i in range(0, 6, 2)), order
    assert written_version(final) in set("abc") and hidden(tmp_path) == []
    with pytest.raises(RuntimeError, match="already writing"):
        with atomic_dir(final):
            with atomic_dir(tmp_path / "." / "artifact"):
                pass
    assert written_version(final) in set("abc") and hidden(tmp_path) == []


# --- ingest killed at random points ---------------------------------------------------------------


def big_pairwise_csv(path: Path, n: int = 60_000) -> Path:
    rng = np.random.default_rng(0)
    prompts = np.array([f"prompt {i} on topic {i % 97}" for i in range(n // 2)])
    models = [f"m{i}" for i in range(6)]
    pd.DataFrame({"prompt": prompts[rng.integers(0, len(prompts), n)], "model_a": rng.choice(models, n),
                  "model_b": rng.choice(models, n),
                  "winner": rng.choice(["model_a", "model_b", "tie", "tie (bothbad)"], n)}).to_csv(path, index=False)
    return path


def assert_complete(out: Path, n_rows: int) -> dict:
    """data/processed/NAME as a reader sees it: manifest, dataset and battles, all consistent."""
    m = read_json(out / "manifest.json")
    assert m["n_rows_in"] == n_rows
    assert len(datasets.load_from_disk(str(out / "dataset"))) == m["n_prompts"]
    assert len(datasets.load_from_disk(str(out / "battles"))) == m["n_battles"] == m["n_rows_used"]
    return m


def test_ingest_killed_at_random_points_leaves_absent_or_complete_and_reruns(tmp_path, data_dir, cli):
    src = big_pairwise_csv(tmp_path / "battles.csv")
    env = env_for(tmp_path)
    processed = data_dir / "processed"
    out = processed / "battles"
    ingest = [sys.executable, "-m", "pipeline", "ingest", str(src)]

    # The first ingest, killed as soon as it starts writing: no dataset, only a temporary.
    assert kill_while_writing(ingest, env, lambda: bool(list(processed.glob(".battles.tmp-*"))), out) is None
    assert not out.exists() and hidden(data_dir)

    # The rerun writes it whole and removes what the killed run left (temporary, read cache).
    t0 = time.monotonic()
    assert subprocess.run(ingest, env=env, capture_output=True).returncode == 0
    seconds = time.monotonic() - t0
    first = assert_complete(out, 60_000)
    assert hidden(data_dir) == []

    # Forced re-ingests killed at random points: the previous dataset or the new one, whole.
    for delay in sorted(random.uniform(0.3, 1.0) * seconds for _ in range(2)):
        code = kill_after(ingest + ["--force"], env, delay=delay)
        assert code in (None, 0)
        if out.exists() or code == 0:
            m = assert_complete(out, 60_000)
            assert m["content_hash"] == first["content_hash"] and m["dropped"] == first["dropped"]

    # Unchanged input: a rerun skips, or redoes a dataset a kill left absent; a write cleans up.
    code, text = cli("ingest", src)
    assert code == 0 and ("battles: unchanged, skipping" in text or "ingested battles" in text), text
    assert cli("ingest", src, "--force")[0] == 0
    assert assert_complete(out, 60_000)["content_hash"] == first["content_hash"]
    assert hidden(data_dir) == []
    code, text = cli("ingest", src)
    assert code == 0 and "battles: unchanged, skipping" in text


# --- reruns pick up finished stages ---------------------------------------------------------------


def test_rerun_of_unchanged_ingest_and_label_skips_both(data_dir, demo_files, cli):
    assert cli("ingest", demo_files["pairwise"])[0] == 0
    assert cli("label", "demo_pairwise")[0] == 0
    out = data_dir / "processed" / "demo_pairwise"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "manifest.json", out / "labels" / "label_stats.json")}
    arrow = sorted(out.rglob("*.arrow"))
    os.utime(demo_files["pairwise"])  # a newer mtime alone is no change: the content hash decides

    code, text = cli("ingest", demo_files["pairwise"])
    assert code == 0 and "demo_pairwise: unchanged, skipping" in text and "ingested" not in text
    code, text = cli("label", "demo_pairwise")
    assert code == 0 and "demo_pairwise: labels unchanged, skipping" in text and "labels: demo_pairwise" not in text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and sorted(out.rglob("*.arrow")) == arrow

    # A changed label option redoes label only.
    code, text = cli("label", "demo_pairwise", "--set", "label.test_fraction=0.3")
    assert code == 0 and "labels: demo_pairwise" in text
    assert (out / "manifest.json").stat().st_mtime_ns == stamps[out / "manifest.json"]


def test_label_killed_then_rerun_skips_ingest_and_finishes_label(tmp_path, data_dir, demo_files, cli):
    assert cli("ingest", demo_files["long"])[0] == 0
    out = data_dir / "processed" / "demo_long"
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns

    # Killed as soon as label starts writing: no labels (the dataset untouched), a stale temporary.
    label = [sys.executable, "-m", "pipeline", "label", "demo_long"]
    assert kill_while_writing(label, env_for(tmp_path), lambda: bool(list(out.glob(".labels.tmp-*"))),
                              out / "labels") is None
    assert not (out / "labels").exists() and hidden(out)

    code, text = cli("ingest", demo_files["long"])
    assert code == 0 and "demo_long: unchanged, skipping" in text
    code, text = cli("label", "demo_long")
    assert code == 0 and "labels: demo_long" in text, text
    assert (out / "manifest.json").stat().st_mtime_ns == manifest_mtime
    stats = read_json(out / "labels" / "label_stats.json")
    assert len(datasets.load_from_disk(str(out / "labels" / "dataset"))) == stats["n_prompts"]
    assert hidden(out) == []


# --- the whole pipeline, killed while training ----------------------------------------------------


@pytest.mark.slow
def test_run_killed_while_training_resumes_without_redoing_ingest_and_label(tmp_path):
    """`prerouter run` on 150 demo prompts with a tiny teacher (about a minute, twice)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline.demo import generate
    from tiny import make_tiny_teacher

    data = generate(tmp_path / "raw", n_prompts=150, seed=0)["wide"]
    teacher = make_tiny_teacher(tmp_path / "teacher")
    env = env_for(tmp_path)
    models, processed = tmp_path / "models" / "demo", tmp_path / "data" / "processed" / "demo"
    run = [sys.executable, "-m", "pipeline", "run", str(data), "--name", "demo", "--budget-ms", "1000"]
    for override in (f"teacher.path={teacher}", "teacher.epochs=1", "train.max_epochs=1", "student.dim=32",
                     "student.hidden=32", "export.latency_decisions=20", "export.min_int8_agreement=0",
                     "export.max_int8_apgr_drop=1"):
        run += ["--set", override]

    # Killed at a random moment after training started writing its checkpoint.
    started = []

    def training_then_random_delay() -> bool:
        if not started and list(models.glob(".checkpoint.tmp-*")):
            started.append(time.monotonic() + random.uniform(0.0, 3.0))
        return bool(started) and time.monotonic() >= started[0]

    assert kill_after(run, env, when=training_then_random_delay, poll=0.05) is None
    assert read_json(processed / "labels" / "label_stats.json")["name"] == "demo"  # finished before the kill
    assert not (models / "checkpoint").exists() or (models / "checkpoint" / "meta.json").is_file()
    if (models / "bundle").exists():  # the kill may land after export on a fast machine: then it is complete
        from pipeline.runtime import Router

        Router.load(models / "bundle")  # verifies every file's sha256
    stamps = {p: p.stat().st_mtime_ns for p in (processed / "manifest.json", processed / "labels" / "label_stats.json")}

    proc = subprocess.run(run, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo: unchanged, skipping" in proc.stderr and "demo: labels unchanged, skipping" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert hidden(tmp_path / "models") == [] and hidden(tmp_path / "data") == []

    from pipeline.runtime import Router

    assert Router.load(models / "bundle").route("What is the capital of France?") in {"small-7b", "medium-34b",
                                                                                      "large-70b"}
