"""The fault trials of bench/faults.py on the tiny random Llama, in CI: the CLI runs in-process (click's runner)
where one process suffices, and as real processes where the trial needs two (concurrent writers)."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main as cli

_spec = importlib.util.spec_from_file_location("faults", Path(__file__).resolve().parents[1] / "bench" / "faults.py")
faults = sys.modules.setdefault("faults", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(faults)

# Not here: the disk-full trials need root for their tmpfs (test_store.py and test_train.py inject ENOSPC instead);
# the kills (a writer holding a shard, target/ half written, training, training saving final/) and the moved store
# need timing windows; their mechanisms are tested directly (test_store.py: locks die with their process, dead
# writers' temporary files; test_train.py: the resumed summary, a dead writer's final.tmp-<pid>, a moved store).
CI_TRIALS = [
    "deleted chunk -> train",
    "flipped chunk byte -> train",
    "doubled length in index.arrow -> train",
    "edited chunk size in zarr.json -> train",
    "two extractors, same --out/rank, together",
    "shard committed without an array",
    "byte flip only verify sees",
    "edited aux ids in store.arrow",
    "truncated store.arrow",
    "truncated chunk -> train",
    "flipped input_ids byte, --integrity open",
    "dead writers' .tmp-verify/.tmp-store/.tmp-shard",
    "empty, whitespace, [], UTF-16, 256 KB binary",
    "flipped byte in target weights",
    "shard-00002 replaced by a copy of shard-00001",
    "two shard directories swapped",
    "two trainers, same --out, together",
    "verify on a read-only store",
    "extract --json while waiting for another writer's shard",
]


def inprocess_cli(*args, timeout: float | None = None) -> faults.Result:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
    err = res.stderr + ("".join(traceback.format_exception(res.exception)) if crashed else "")
    return faults.Result(res.exit_code, res.stdout, err, crashed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir) -> faults.Setup:
    s = faults.Setup(tmp_path_factory.mktemp("faults"), ["--model", str(tiny_llama_dir)],
                     ["--limit", "24", "--max-length", "128", "--shard-size", "4", "--top-k", "8"],
                     ["--tokens-per-batch", "512", "--lr", "3e-3"], cli=inprocess_cli)  # fmt: skip
    s.prepare()
    return s


def test_ci_trials_exist():
    assert set(CI_TRIALS) <= {name for name, *_ in faults.TRIALS}


@pytest.mark.parametrize("name", CI_TRIALS)
def test_fault_trial(setup, name, one_thread):
    _, failure, expected, fn = next(t for t in faults.TRIALS if t[0] == name)
    ok, observed = fn(setup)
    assert ok, f"failure {failure}: expected {expected}; observed {observed}"


def test_expected_faults_are_one_line_and_bugs_keep_their_traceback():
    import errno

    from pipeline.cli import _expected_fault
    from pipeline.store import StoreError

    assert _expected_fault(StoreError("feats/store.arrow: damaged")) == "feats/store.arrow: damaged"
    full = _expected_fault(OSError(errno.ENOSPC, "No space left on device", "runs/a/final/model.safetensors"))
    assert full.startswith("runs/a/final/model.safetensors: No space left on device; ")
    missing = _expected_fault(ModuleNotFoundError("No module named 'zarr'", name="zarr"))
    assert "'zarr' is not installed" in missing
    assert _expected_fault(ValueError("a bug")) is None and _expected_fault(KeyError("x")) is None
