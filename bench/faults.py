"""Fault-injection trials, run from outside as a user would meet the faults: each trial damages a store, an input
or a running process, runs the `pipeline` CLI, and compares what happened with what must happen. Prints the table
trial | expected | observed | pass, and writes every observation to WORK/faults.json.

    python bench/faults.py [--tiny] [--records 24] [--max-length 256] [--shard-size 4] [--only NAME,...] [--work DIR]

Default: the embedded SmolLM2 on the first 24 ShareGPT records (max 256 tokens, 4 records per shard: 22 samples in
6 shards), the setup of issue 15; ``--tiny`` uses a seeded random 8-layer Llama with SmolLM2's tokenizer instead
(what tests/test_faults.py runs in CI, in-process where one process suffices). "Identical" means every tensor,
index, token-count and target file bit for bit equal to the clean extraction's (commit records hold times and pids).
Disk full is a real one: a tmpfs mounted for the trial (needs root; otherwise the trial reports that it did not
run, and tests/test_faults.py covers the same path by injecting ENOSPC into the writer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Result:
    rc: int
    out: str
    err: str
    traceback: bool

    @property
    def last_error(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


# A process that trained in-process (tests/test_faults.py) holds these; a CLI it starts must pick its own rendezvous
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return dict(base, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip


def subprocess_cli(*args, timeout: float = 1800) -> Result:
    """`python -m pipeline.cli ARGS` in a fresh process."""
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env(), capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr, TRACEBACK in p.stderr)


def popen_cli(*args) -> subprocess.Popen:
    """The CLI started in the background; its output goes to temporary files (a full pipe would stall it)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env(), text=True, stdout=out,
                         stderr=err)  # fmt: skip
    p.logs = (out, err)
    return p


def finish(p: subprocess.Popen) -> Result:
    rc = p.wait()
    out, err = (f.seek(0) or f.read() for f in p.logs)
    return Result(rc, out, err, TRACEBACK in err)


@dataclass
class Setup:
    """Where the trials run and how they call the CLI (``cli`` may run in-process; ``popen`` is always a process)."""

    work: Path
    model_args: list[str]
    extract_args: list[str]
    train_args: list[str]
    cli: Callable[..., Result] = subprocess_cli
    popen: Callable[..., subprocess.Popen] = popen_cli
    clean: Path | None = None
    clean_files: dict[str, str] = field(default_factory=dict)

    def extract(self, out: Path, *extra) -> Result:
        return self.cli("extract", *self.model_args, "--out", out, *self.extract_args, "--no-progress", *extra)

    def extract_cmd(self, out: Path) -> list:
        return ["extract", *self.model_args, "--out", out, *self.extract_args, "--no-progress"]

    def train(self, feats: Path, out: Path, *extra) -> Result:
        return self.cli("train", "--feats", feats, "--out", out, *self.train_args, "--no-progress", *extra)

    def prepare(self) -> None:
        self.clean = self.work / "clean"
        if not (self.clean / "store.arrow").exists():
            res = self.extract(self.clean)
            if res.rc:
                raise SystemExit(f"the clean extraction failed:\n{res.err[-3000:]}")
        self.clean_files = store_files(self.clean)

    def copy(self, name: str) -> Path:
        dest = self.work / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.clean, dest, ignore=shutil.ignore_patterns("verify.arrow"))
        return dest

    def fresh(self, name: str) -> Path:
        dest = self.work / name
        shutil.rmtree(dest, ignore_errors=True)
        return dest


# ---------------------------------------------------------------------------------------------------- helpers


def store_files(root: Path) -> dict[str, str]:
    """sha256 of every file that a clean run writes deterministically (all but the shards' commit records)."""
    files = [p for d in sorted((root / "shards").glob("shard-*")) for p in d.rglob("*") if p.name != "commit.arrow"]
    files += list((root / "target").rglob("*"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}


def identical(setup: Setup, root: Path) -> tuple[bool, str]:
    same = store_files(root) == setup.clean_files
    return same, "identical" if same else "NOT identical"


def repaired(res: Result, what: str) -> tuple[bool, str]:
    """The re-run of an extraction succeeded and said it repaired something."""
    ok = res.rc == 0 and "repaired" in res.out
    return ok, f"re-run exit {res.rc}, {what if ok else 'nothing repaired'}"


def flip(path: Path, offset: int | None = None, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= mask
    path.write_bytes(bytes(data))


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as f:
        return ipc.open_file(f).read_all()


def write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def shard(root: Path, n: int) -> Path:
    return root / "shards" / f"shard-{n:05d}"


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in [*root.glob(".tmp-*"), *(root / "shards").glob(".tmp-*")])


def refused(res: Result, *names: str) -> tuple[bool, str]:
    """A fault must end in exit != 0, no traceback, and a last line ``error: ...`` naming ``names``."""
    last = res.last_error
    ok = res.rc != 0 and not res.traceback and last.startswith("error:") and all(n in last for n in names)
    return ok, f"exit {res.rc}{', TRACEBACK' if res.traceback else ''}: {last}"


def all_ok(*checks: tuple[bool, str]) -> tuple[bool, str]:
    return all(ok for ok, _ in checks), " | ".join(obs for _, obs in checks)


def succeeded(res: Result, what: str) -> tuple[bool, str]:
    return res.rc == 0, f"{what} exit {res.rc}" + ("" if res.rc == 0 else f" ({res.last_error})")


def verified(setup: Setup, root: Path) -> tuple[bool, str]:
    res = setup.cli("verify", root)
    return res.rc == 0, f"verify exit {res.rc}"


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.002) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


# ---------------------------------------------------------------------------------------------------- trials
# Each returns (pass, observed). The failure number is issue 15's.


def t_deleted_chunk(s: Setup) -> tuple[bool, str]:
    root = s.copy("deleted-chunk")
    victim = shard(root, 2) / "tensors" / "hidden_last" / "c" / "0" / "0"
    victim.unlink()
    inspect = s.cli("inspect", root)
    return all_ok(refused(s.train(root, s.work / "run-deleted", "--epochs", "1"), "shard-00002", "hidden_last"),
                  (inspect.rc == 0 and "corrupt" in inspect.out, f"inspect exit {inspect.rc}, shard 2 "
                   f"{'corrupt' if 'corrupt' in inspect.out else 'not flagged'}"))  # fmt: skip


def t_flipped_chunk_byte(s: Setup) -> tuple[bool, str]:
    root = s.copy("flipped-chunk")
    flip(shard(root, 3) / "tensors" / "hidden_last" / "c" / "0" / "0")
    return refused(s.train(root, s.work / "run-flipped", "--epochs", "1"), "shard-00003", "hidden_last")


def t_doubled_index_length(s: Setup) -> tuple[bool, str]:
    root = s.copy("doubled-length")
    path = shard(root, 1) / "index.arrow"
    t = read_arrow(path)
    rows = t.to_pylist()
    rows[0]["length"] *= 2
    write_arrow(path, pa.Table.from_pylist(rows, schema=t.schema))
    return refused(s.train(root, s.work / "run-doubled", "--epochs", "1"), "shard-00001", "index.arrow")


def t_edited_chunk_size(s: Setup) -> tuple[bool, str]:
    root = s.copy("edited-zarr-json")
    path = shard(root, 1) / "tensors" / "hidden_last" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] //= 2
    path.write_text(json.dumps(meta, indent=2))
    return refused(s.train(root, s.work / "run-zarr", "--epochs", "1"), "shard-00001", "zarr.json")


def _two_extractors(s: Setup, name: str, gap: float) -> tuple[bool, str]:
    root = s.fresh(name)
    a = s.popen(*s.extract_cmd(root))
    time.sleep(gap)
    b = s.popen(*s.extract_cmd(root))
    results = [finish(p) for p in (a, b)]
    inspect = s.cli("inspect", root)
    return all_ok((all(r.rc == 0 for r in results), "exits " + ", ".join(
                   f"{r.rc}" + (f" ({r.last_error})" if r.rc else "") for r in results)),  # fmt: skip
                  identical(s, root),
                  verified(s, root), (inspect.rc == 0, f"inspect exit {inspect.rc}"))


def t_concurrent_together(s: Setup) -> tuple[bool, str]:
    return _two_extractors(s, "concurrent-0s", 0.0)


def t_concurrent_3s(s: Setup) -> tuple[bool, str]:
    return _two_extractors(s, "concurrent-3s", 3.0)


def t_stale_claim(s: Setup) -> tuple[bool, str]:
    """A writer killed while it holds a shard: its claim dies with it, the next run redoes the shard."""
    root = s.fresh("stale-claim")
    p = s.popen(*s.extract_cmd(root))
    caught = wait_for(lambda: bool(list((root / "shards").glob(".tmp-shard-*"))) if (root / "shards").exists()
                      else False, 600)  # fmt: skip
    p.send_signal(signal.SIGKILL)
    finish(p)
    left = leftovers(root)
    res = s.extract(root)
    return all_ok((caught and bool(left), f"killed holding {left[:1]}"), succeeded(res, "re-run"),
                  identical(s, root), (not leftovers(root), f"temporary files: {leftovers(root) or 'none'}"),
                  verified(s, root))  # fmt: skip


def t_incomplete_shard_repaired(s: Setup) -> tuple[bool, str]:
    """What failure 2 left behind (a shard committed without one array's files) is refused, then redone."""
    root = s.copy("incomplete-shard")
    d = shard(root, 1)
    shutil.rmtree(d / "tensors" / "hidden_aux")
    commit = read_arrow(d / "commit.arrow")
    keep = [r for r in commit.to_pylist() if not r["path"].startswith("tensors/hidden_aux/")]
    write_arrow(d / "commit.arrow", pa.Table.from_pylist(keep, schema=commit.schema))
    train = refused(s.train(root, s.work / "run-incomplete", "--variant", "eagle3", "--max-steps", "1",
                            "--draft-vocab-size", "1024", "--ttt-steps", "2"), "shard-00001", "hidden_aux")  # fmt: skip
    res = s.extract(root)
    return all_ok(train, repaired(res, "redid shard 1"),
                  identical(s, root), verified(s, root))  # fmt: skip


def t_verify_flagged_repaired(s: Setup) -> tuple[bool, str]:
    """A flipped byte only `verify` can see: the re-run redoes the shards verify named."""
    root = s.copy("verify-flagged")
    flip(shard(root, 4) / "tensors" / "topk_logprobs" / "c" / "0" / "0")
    v = s.cli("verify", root)
    res = s.extract(root)
    return all_ok((v.rc == 1 and "shard-00004" in v.err, f"verify exit {v.rc}"),
                  repaired(res, "redid shard 4"),
                  identical(s, root), verified(s, root))  # fmt: skip


def t_edited_fingerprint(s: Setup) -> tuple[bool, str]:
    root = s.copy("edited-fingerprint")
    path = root / "store.arrow"
    t = read_arrow(path)
    row = t.to_pylist()[0]
    fp = json.loads(row["fingerprint"])
    fp["layers"]["aux"][-1] += 1  # the digest is left as it was
    row["fingerprint"] = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    write_arrow(path, pa.Table.from_pylist([row], schema=t.schema))
    v = s.cli("verify", root)
    train = refused(s.train(root, s.work / "run-fp", "--variant", "eagle3", "--max-steps", "1",
                            "--draft-vocab-size", "1024", "--ttt-steps", "2"), "store.arrow", "digest")  # fmt: skip
    res = s.extract(root)
    return all_ok((v.rc == 1 and "store.arrow" in v.err, f"verify exit {v.rc}"), train,
                  repaired(res, "rewrote store.arrow"), verified(s, root))  # fmt: skip


def t_truncated_store_arrow(s: Setup) -> tuple[bool, str]:
    root = s.copy("truncated-store-arrow")
    path = root / "store.arrow"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return all_ok(refused(s.cli("verify", root), "store.arrow"), refused(s.cli("inspect", root), "store.arrow"),
                  refused(s.train(root, s.work / "run-trunc", "--max-steps", "1"), "store.arrow"))


def t_truncated_chunk(s: Setup) -> tuple[bool, str]:
    root = s.copy("truncated-chunk")
    victim = shard(root, 4) / "tensors" / "hidden_last" / "c" / "0" / "0"
    os.truncate(victim, victim.stat().st_size // 3)
    return refused(s.train(root, s.work / "run-trunc-chunk", "--epochs", "1"), "shard-00004", "hidden_last")


def t_flipped_input_id(s: Setup) -> tuple[bool, str]:
    """With only the cheap checks (--integrity open), a corrupt token id is still an error naming the shard."""
    root = s.copy("flipped-input-id")
    ids = shard(root, 3) / "tensors" / "input_ids"
    flip(ids / "c" / "0", offset=3, mask=0x40)  # +2^30 on the first id; in a compressed chunk, a damaged stream
    what = "cannot be decoded" if '"zstd"' in (ids / "zarr.json").read_text() else "outside the vocabulary"
    return refused(s.train(root, s.work / "run-ids", "--epochs", "1", "--integrity", "open"), "shard 3", what)


def t_disk_full(s: Setup) -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not run: mounting a tmpfs needs root (tests/test_faults.py injects ENOSPC instead)"
    mnt = s.work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    need = sum(p.stat().st_blocks * 512 for p in s.clean.rglob("*") if p.is_file())
    shards = sum(p.stat().st_blocks * 512 for p in (s.clean / "shards").rglob("*") if p.is_file())
    size = (need - shards // 2) // 4096 * 4096  # the target and about half the shards fit
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        root = mnt / "store"
        first = refused(s.extract(root), "No space left on device", "free space")
        left = leftovers(root)
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill what is left: verify must still report, leave nothing
            try:
                while f.write(b"\0" * (1 << 16)):
                    pass
            except OSError:
                pass
        v = s.cli("verify", root)
        verify = (v.rc == 2 and not v.traceback and "BAD" in v.err and "No space left" in v.last_error
                  and not leftovers(root), f"verify on the full disk: exit {v.rc}, report printed, "
                  f"{'no temporary files' if not leftovers(root) else leftovers(root)}: {v.last_error}")  # fmt: skip
        filler.unlink()
        subprocess.run(["mount", "-o", f"remount,size={need * 2}", str(mnt)], check=True)
        res = s.extract(root)
        return all_ok(first, (not left, f"temporary files after the failure: {left or 'none'}"), verify,
                      succeeded(res, "re-run with space"),
                      identical(s, root), verified(s, root))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def t_killed_during_target(s: Setup) -> tuple[bool, str]:
    for _attempt in range(3):
        root = s.fresh("killed-target")
        p = s.popen(*s.extract_cmd(root))
        caught = wait_for(lambda: bool(list(root.glob(".tmp-target-*"))), 600, step=0.001)  # noqa: B023
        p.send_signal(signal.SIGKILL)
        finish(p)
        left = [x for x in leftovers(root) if x.startswith(".tmp-target")]
        if caught and left:
            break
    else:
        return False, "never caught the process writing target/"
    v = s.cli("verify", root)
    noted = any(ln.startswith("NOTE") and ".tmp-target" in ln and "dead writer" in ln for ln in v.err.splitlines())
    res = s.extract(root)
    return all_ok((noted, f"left {left[0]}; verify {'reports' if noted else 'does NOT report'} it"),
                  (res.rc == 0 and not leftovers(root), f"re-run exit {res.rc}, "
                   f"{'removed it' if not leftovers(root) else leftovers(root)}"),
                  identical(s, root), verified(s, root))  # fmt: skip


def t_dead_writers_leftovers(s: Setup) -> tuple[bool, str]:
    root = s.copy("dead-leftovers")
    (root / ".tmp-verify.arrow-deadhost-999999").write_bytes(b"partial")
    (root / ".tmp-store.arrow-deadhost-999999").write_bytes(b"partial")
    tmp_shard = root / "shards" / ".tmp-shard-00002-deadhost-999999-0badc0de"
    (tmp_shard / "tensors").mkdir(parents=True)
    (tmp_shard / "tensors" / "junk").write_bytes(b"\0" * 4096)
    v = s.cli("verify", root)
    notes = [ln for ln in v.err.splitlines() if ln.startswith("NOTE")]
    res = s.extract(root)
    return all_ok((v.rc == 0 and len(notes) == 3, f"verify exit {v.rc}, {len(notes)} leftovers reported"),
                  (res.rc == 0 and not leftovers(root), f"re-run exit {res.rc}, "
                   f"{'cleaned' if not leftovers(root) else leftovers(root)}"))  # fmt: skip


def t_empty_inputs(s: Setup) -> tuple[bool, str]:
    inputs = {"empty": b"", "whitespace": b"  \n\n \t ", "empty-array": b"[]\n",
              "utf16": json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                  {"from": "gpt", "value": "hello"}]}]).encode("utf-16"),
              "binary-256k": hashlib.sha256(b"seed").digest() * 8192}  # fmt: skip
    checks = []
    for name, data in inputs.items():
        path = s.work / f"input-{name}.json"
        path.write_bytes(data)
        out = s.fresh(f"empty-{name}")
        res = s.extract(out, "--data", path)
        ok, obs = refused(res, path.name)
        checks.append((ok and not (out / "store.arrow").exists(), f"{name}: {obs[:90]}"))
    return all_ok(*checks)


def t_target_weights(s: Setup) -> tuple[bool, str]:
    root = s.copy("target-weights")
    flip(root / "target" / "weights.safetensors", offset=(root / "target" / "weights.safetensors").stat().st_size - 64)
    unverified = s.copy("target-weights-unverified")
    flip(unverified / "target" / "weights.safetensors",
         offset=(unverified / "target" / "weights.safetensors").stat().st_size - 64)  # fmt: skip
    v = s.cli("verify", root)
    train = refused(s.train(unverified, s.work / "run-target", "--max-steps", "1"), "weights.safetensors")
    res = s.extract(unverified)
    return all_ok((v.rc == 1 and "target/weights.safetensors" in v.err, f"verify exit {v.rc}"), train,
                  repaired(res, "rewrote target"),
                  identical(s, unverified))  # fmt: skip


def t_resume_summary(s: Setup) -> tuple[bool, str]:
    run = s.fresh("run-resume")
    args = ["train", "--feats", s.clean, "--out", run, *s.train_args, "--no-progress", "--max-steps", "8",
            "--save-every", "4"]  # fmt: skip
    p = s.popen(*args)
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text().strip() == "step4", 900, step=0.02)
    p.send_signal(signal.SIGKILL)
    finish(p)
    if (run / "summary.json").exists():
        return False, "the run finished before it could be killed"
    res = s.cli(*args)
    line = next((ln for ln in res.out.splitlines() if ln.startswith("loss")), "")
    return res.rc == 0 and "(step 5)" in line and "steps 5-8" in res.out, f"exit {res.rc}: {line.strip()}"


# ---- issue 24: shards bound to their place


def t_copied_shard(s: Setup) -> tuple[bool, str]:
    """shard-00002's directory replaced by a copy of committed shard-00001 (samples 4-7 twice, 8-11 gone)."""
    root = s.copy("copied-shard")
    shutil.rmtree(shard(root, 2))
    shutil.copytree(shard(root, 1), shard(root, 2))
    v = s.cli("verify", root)
    bad = [ln for ln in v.err.splitlines() if ln.startswith("BAD")]
    train = refused(s.train(root, s.work / "run-copied", "--max-steps", "1"), "shard-00002")
    res = s.extract(root)
    return all_ok((v.rc == 1 and len(bad) == 1 and "shard-00002" in bad[0], f"verify exit {v.rc}: {bad[:1]}"),
                  train, repaired(res, "redid shard 2"), identical(s, root), verified(s, root))  # fmt: skip


def t_swapped_shards(s: Setup) -> tuple[bool, str]:
    root = s.copy("swapped-shards")
    a, b, tmp = shard(root, 1), shard(root, 4), root / "shards" / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    v = s.cli("verify", root)
    bad = [ln for ln in v.err.splitlines() if ln.startswith("BAD")]
    train = refused(s.train(root, s.work / "run-swapped", "--max-steps", "1"), "shard-00001", "shard-00004")
    res = s.extract(root)
    return all_ok((v.rc == 1 and len(bad) == 2, f"verify exit {v.rc}: {len(bad)} BAD lines"), train,
                  repaired(res, "redid shards 1 and 4"), identical(s, root), verified(s, root))  # fmt: skip


# ---- issue 24: training's run directory, verify on a read-only store, --json while waiting

TRAIN_RUN = ["--max-steps", "4", "--save-every", "2"]


def train_cmd(s: Setup, feats: Path, out: Path, *extra) -> list:
    return ["train", "--feats", feats, "--out", out, *s.train_args, "--no-progress", *TRAIN_RUN, *extra]


def clean_run(s: Setup) -> Path:
    """A training run on the clean store that nothing disturbed: the reference of the training trials."""
    run = s.work / "run-clean"
    if not (run / "summary.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        res = s.cli(*train_cmd(s, s.clean, run))
        if res.rc:
            raise RuntimeError(f"the clean training run failed: {res.last_error}")
    return run


def metrics_of(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def same_run(s: Setup, run: Path) -> tuple[bool, str]:
    """Every step's loss and the final weights bit for bit those of the undisturbed run."""
    ref = clean_run(s)

    def losses(r: Path) -> list[float]:
        return [m["loss"] for m in metrics_of(r) if m.get("kind") == "train"]

    def weights(r: Path) -> str | None:
        f = r / "final" / "model.safetensors"
        return hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None

    same = losses(run) == losses(ref) and weights(run) == weights(ref) is not None
    return same, "losses and final weights identical" if same else (
        f"NOT identical (steps {[m['step'] for m in metrics_of(run) if m.get('kind') == 'train']})")  # fmt: skip


def _two_trainers(s: Setup, name: str, gap: float) -> tuple[bool, str]:
    run = s.fresh(name)
    a = s.popen(*train_cmd(s, s.clean, run))
    time.sleep(gap)
    b = s.popen(*train_cmd(s, s.clean, run))
    results = [finish(p) for p in (a, b)]
    won = [r for r in results if r.rc == 0]
    lost = [r for r in results if r.rc != 0]
    # the loser is refused naming the holder, or, where the winner finished before the loser got that far (a tiny
    # model on a loaded machine), as a finished run: never a second writer either way
    refusal = (False, "none refused")
    if lost:
        refusal = max(refused(lost[0], "being written by another `pipeline train`", "pid"),
                      refused(lost[0], "holds a finished run"), key=lambda r: r[0])
    steps = [m["step"] for m in metrics_of(run) if m.get("kind") == "train"]
    return all_ok((len(won) == 1, f"exits {results[0].rc}, {results[1].rc}"), refusal,
                  (steps == list(range(1, 5)), f"metrics.jsonl steps {steps}"), same_run(s, run))


def t_two_trainers_together(s: Setup) -> tuple[bool, str]:
    return _two_trainers(s, "two-trainers-0s", 0.0)


def t_two_trainers_4s(s: Setup) -> tuple[bool, str]:
    return _two_trainers(s, "two-trainers-4s", 4.0)


def _du(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def t_train_disk_full(s: Setup) -> tuple[bool, str]:
    """A real full disk (a tmpfs) under the run directory: first while it writes a checkpoint, then while it writes
    final/; one line each, and the re-run with space ends as the undisturbed run."""
    if os.geteuid() != 0:
        return False, "not run: mounting a tmpfs needs root (tests/test_train.py injects the same errors instead)"
    ref = clean_run(s)
    ckpt, final = _du(ref / "checkpoints" / "step2"), _du(ref / "final")
    checks = []
    for what, size, names in (("checkpoint", ckpt // 2, ("checkpoints/step2", "No space left", "free space")),
                              ("final/", 2 * ckpt + final // 2, ("final/model.safetensors", "No space left",
                                                                 "free space"))):  # fmt: skip
        mnt = s.fresh(f"train-tmpfs-{what.strip('/')}")
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 4096 * 4096}", "tmpfs", str(mnt)], check=True)
        try:
            run = mnt / "run"
            first = refused(s.cli(*train_cmd(s, s.clean, run)), *names)
            left = [p.name for p in run.iterdir() if ".tmp-" in p.name] if run.exists() else []
            subprocess.run(["mount", "-o", f"remount,size={4 * (ckpt + final)}", str(mnt)], check=True)
            res = s.cli(*train_cmd(s, s.clean, run))
            checks += [(first[0], f"{what}: {first[1]}"), (not left, f"temporary files: {left or 'none'}"),
                       succeeded(res, "re-run with space"), same_run(s, run)]  # fmt: skip
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    return all_ok(*checks)


def t_killed_saving_final(s: Setup) -> tuple[bool, str]:
    for _attempt in range(3):
        run = s.fresh("killed-final")
        p = s.popen(*train_cmd(s, s.clean, run))
        # killed once final.tmp-<pid>/ exists (its weights file lives for a few ms only: polling misses it)
        wait_for(lambda: bool(list(run.glob("final.tmp-*"))) or p.poll() is not None, 900, step=0.001)  # noqa: B023
        p.send_signal(signal.SIGKILL)
        finish(p)
        left = [f"{x.name} ({sum(f.stat().st_size for f in x.rglob('*') if f.is_file()):,} bytes)"
                for x in run.glob("final.tmp-*")]  # fmt: skip
        if left and not (run / "summary.json").exists():
            break
    else:
        return False, "never caught the process writing final/"
    res = s.cli(*train_cmd(s, s.clean, run))
    cleaned = next((ln.strip() for ln in res.out.splitlines() if ln.startswith("cleaned")), "")
    return all_ok((res.rc == 0 and left[0].split()[0] in cleaned and not list(run.glob("*.tmp-*")),
                   f"killed leaving {left[0]}; re-run exit {res.rc}: {cleaned or 'nothing reported'}"),
                  same_run(s, run))  # fmt: skip


def t_verify_read_only(s: Setup) -> tuple[bool, str]:
    """verify on a store it may not write: a read-only bind mount (root), else a store without write permission."""
    root = s.copy("read-only")
    view = s.fresh("read-only-mount")
    if os.geteuid() == 0:
        view.mkdir()
        subprocess.run(["mount", "--bind", str(root), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    else:
        view = root
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
    try:
        v = s.cli("verify", view)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(view)], check=False)
        else:
            for p in [root, *root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)
    verdict = next((ln for ln in v.out.splitlines() if ln.startswith("verify:")), "")
    note = next((ln for ln in v.err.splitlines() if ln.startswith("note:")), "")
    return (v.rc == 0 and verdict.endswith("ok") and "not recorded" in note and not v.traceback,
            f"exit {v.rc}: {verdict} / {note}")


def t_extract_json_waiting(s: Setup) -> tuple[bool, str]:
    """--json while another writer holds a shard: the waiting message on stderr, only the JSON summary on stdout."""
    sys.path.insert(0, str(REPO))
    from pipeline.locks import FileLock

    root = s.fresh("json-waiting")
    held = FileLock(root / ".locks" / "shard-00005.lock")  # this process plays the other writer of shard 5
    held.acquire()
    try:
        p = s.popen(*s.extract_cmd(root), "--json")
        waited = wait_for(lambda: "waiting for" in (p.logs[1].seek(0) or p.logs[1].read()), 900, step=0.05)
    finally:
        held.release()
    res = finish(p)
    try:
        summary = json.loads(res.out)
        parsed = f"stdout parses as JSON ({summary['samples_written']} samples)"
    except ValueError as e:
        summary, parsed = None, f"stdout does NOT parse: {e}; starts {res.out[:60]!r}"
    message = next((ln.strip() for ln in res.err.splitlines() if "waiting for" in ln), "no waiting message")
    return all_ok((res.rc == 0 and waited, f"exit {res.rc}, stderr: {message}"), (summary is not None, parsed),
                  identical(s, root))


def t_moved_store_resumes(s: Setup) -> tuple[bool, str]:
    """A run whose (unchanged) store was moved: the same fingerprint resumes, and says where the store was."""
    store = s.copy("moved-store-a")
    run = s.fresh("run-moved")
    p = s.popen(*train_cmd(s, store, run))
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: (latest.exists() and latest.read_text().strip() == "step2") or p.poll() is not None, 900,
             step=0.01)  # fmt: skip
    p.send_signal(signal.SIGKILL)
    finish(p)
    moved = s.fresh("moved-store-b")
    store.rename(moved)
    res = s.cli(*train_cmd(s, moved, run))
    line = next((ln.strip() for ln in res.out.splitlines() if ln.startswith("store")), "")
    return all_ok((res.rc == 0 and "moved" in line, f"exit {res.rc}: {line or res.last_error}"), same_run(s, run))


TRIALS: list[tuple[str, int, str, Callable[[Setup], tuple[bool, str]]]] = [
    ("deleted chunk -> train", 1, "train refuses naming the chunk; inspect marks the shard", t_deleted_chunk),
    ("flipped chunk byte -> train", 1, "train refuses naming the chunk (checksum on first read)", t_flipped_chunk_byte),
    ("doubled length in index.arrow -> train", 1, "train refuses naming index.arrow", t_doubled_index_length),
    ("edited chunk size in zarr.json -> train", 1, "train refuses naming zarr.json", t_edited_chunk_size),
    ("two extractors, same --out/rank, together", 2, "both exit 0; identical; verify, inspect ok",
     t_concurrent_together),
    ("two extractors, 3 s apart", 2, "both exit 0; identical; verify, inspect ok", t_concurrent_3s),
    ("writer killed holding a shard", 2, "re-run takes the dead claim over; identical", t_stale_claim),
    ("shard committed without an array", 2, "train refuses; re-run redoes it; identical", t_incomplete_shard_repaired),
    ("byte flip only verify sees", 2, "verify names the shard; re-run redoes it; identical",
     t_verify_flagged_repaired),
    ("edited aux ids in store.arrow", 3, "verify fails, train refuses naming store.arrow; re-run rewrites it",
     t_edited_fingerprint),
    ("truncated store.arrow", 4, "verify, inspect, train: one line naming store.arrow", t_truncated_store_arrow),
    ("truncated chunk -> train", 4, "one line naming the chunk", t_truncated_chunk),
    ("flipped input_ids byte, --integrity open", 4, "one line naming the shard, no IndexError", t_flipped_input_id),
    ("disk full (tmpfs) during extract and verify", 5, "one line each, nothing left behind; resume identical",
     t_disk_full),
    ("kill -9 while writing target/", 6, "verify reports the leftover; re-run removes it; identical",
     t_killed_during_target),
    ("dead writers' .tmp-verify/.tmp-store/.tmp-shard", 6, "verify reports 3 leftovers; re-run removes them",
     t_dead_writers_leftovers),
    ("empty, whitespace, [], UTF-16, 256 KB binary", 7, "one line naming the file each; no store",
     t_empty_inputs),
    ("flipped byte in target weights", 8, "verify fails, train refuses naming it; re-run rewrites it",
     t_target_weights),
    ("summary after a resume", 9, "names the steps it ran (5-8)", t_resume_summary),
    ("shard-00002 replaced by a copy of shard-00001", 24, "verify, train refuse naming shard-00002; re-run "
     "redoes it; identical", t_copied_shard),
    ("two shard directories swapped", 24, "verify, train refuse naming both; re-run redoes them; identical",
     t_swapped_shards),
    ("two trainers, same --out, together", 24, "one refused naming the holder; each step once; identical",
     t_two_trainers_together),
    ("two trainers, same --out, 4 s apart", 24, "one refused naming the holder; each step once; identical",
     t_two_trainers_4s),
    ("disk full (tmpfs) while training writes a checkpoint, final/", 24,
     "one line naming the file each, exit 2; re-run identical", t_train_disk_full),
    ("kill -9 while training saves final/", 24, "re-run removes and reports final.tmp-<pid>; identical",
     t_killed_saving_final),
    ("verify on a read-only store", 24, "verdict printed, then a note that it was not recorded; exit 0",
     t_verify_read_only),
    ("extract --json while waiting for another writer's shard", 24, "waiting on stderr; stdout parses; identical",
     t_extract_json_waiting),
    ("training resumed from a moved store", 24, "same fingerprint resumes, says so; identical",
     t_moved_store_resumes),
]


def run_trials(setup: Setup, names: list[str] | None = None) -> list[dict]:
    setup.prepare()
    rows = []
    for name, failure, expected, fn in TRIALS:
        if names and not any(n in name for n in names):
            continue
        t0 = time.time()
        try:
            ok, observed = fn(setup)
        except Exception as e:  # noqa: BLE001 - a crashing trial is a failed trial, reported in the table
            ok, observed = False, f"trial crashed: {type(e).__name__}: {e}"
        observed = observed.replace(f"{setup.work}/", "")  # paths relative to the work directory
        rows.append({"trial": name, "failure": failure, "expected": expected, "observed": observed, "pass": ok,
                     "seconds": round(time.time() - t0, 1)})  # fmt: skip
        print(f"[{'pass' if ok else 'FAIL'}] {failure}. {name} ({rows[-1]['seconds']} s): {observed}", flush=True)
    return rows


def table(rows: list[dict], width: int = 150) -> str:
    out = ["| # | trial | expected | observed | pass |", "| ---: | --- | --- | --- | --- |"]
    for r in rows:
        obs = r["observed"] if len(r["observed"]) <= width else r["observed"][: width - 1] + "…"
        out.append(f"| {r['failure']} | {r['trial']} | {r['expected']} | {obs.replace('|', '/')} | "
                   f"{'pass' if r['pass'] else '**FAIL**'} |")  # fmt: skip
    return "\n".join(out)


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer

    from pipeline import assets

    path = work / "tiny-llama"
    if not (path / "config.json").exists():
        make_tiny_llama(path, AutoTokenizer.from_pretrained(assets.smollm2_dir()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a seeded random 8-layer Llama instead of SmolLM2")
    ap.add_argument("--records", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated substrings of trial names")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = ["--model", str(tiny_model(work))] if args.tiny else []
    extract = ["--limit", args.records, "--max-length", args.max_length, "--shard-size", args.shard_size]
    train = ["--tokens-per-batch", "1024", *(["--lr", "3e-3"] if args.tiny else [])]
    setup = Setup(work, model, [*map(str, extract), *(["--top-k", "8"] if args.tiny else [])], train)
    t0 = time.time()
    rows = run_trials(setup, [n.strip() for n in args.only.split(",") if n.strip()] or None)
    (work / "faults.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, {args.records} ShareGPT records, "
          f"max {args.max_length} tokens, {args.shard_size} per shard; {time.time() - t0:.0f} s; work dir {work}\n")
    print(table(rows))
    print(f"\n{sum(r['pass'] for r in rows)}/{len(rows)} passed")
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
