"""Crash consistency of ``moequant compress``: after a kill or a full disk at any file-system step,
``--resume`` (or, where the output is already complete, nothing) gives the output of an
uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moequant.checkpoint.writer import output_lock
from moequant.compression import CalibSettings, compress
from moequant.errors import MoequantError
from moequant_cli.main import app
from tests.conftest import StopAfterLayers, add_tokenizer, make_mixtral

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib", "random", "--samples", "2", "--seqlen", "16"]  # GPTQ, so every layer hands on its outputs
SMALL = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


class FaultServer:
    """Runs ``moequant`` commands with a fault injected, each in a child forked by ``tests.fault_cli serve``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_cli", "serve"], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**{k: v for k, v in os.environ.items() if k != "MOEQUANT_DEBUG"},
                                          "OMP_NUM_THREADS": "1"})

    def run(self, kind: str, n: int, args: list[str], env: dict | None = None) -> tuple[int, str]:
        """The exit status (minus the signal, if killed) and the output of ``moequant ARGS``."""
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        request = {"kind": kind, "n": n, "args": args, "log": str(log), "env": env or {}}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fault server stopped"
        return json.loads(answer)["status"], log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    server = FaultServer(tmp_path_factory.mktemp("fault-logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 2-layer Mixtral with a tokenizer (whose files the output copies)."""
    return add_tokenizer(make_mixtral(tmp_path_factory.mktemp("src") / "m", seed=3, **SMALL))


def compress_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", str(source), "-o", str(out), *CALIB, *extra]


def contents(folder: Path) -> dict[str, object]:
    """Every file under ``folder`` by relative path: its bytes, or for moequant.json its record less timing."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        files[rel] = path.read_bytes()
        if rel == "moequant.json":
            files[rel] = {k: v for k, v in json.loads(files[rel]).items() if k != "timing"}
    return files


@pytest.fixture(scope="module")
def reference(faults, source, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("reference") / "out"
    status, log = faults.run("none", 0, compress_args(source, out))
    assert status == 0, log
    return contents(out)


def assert_one_line_error(log: str, *needles: str) -> None:
    lines = [line for line in log.splitlines() if line.strip()]
    assert "Traceback" not in log and lines and lines[-1].startswith("error:"), log
    assert all(needle in lines[-1] for needle in needles), log


def check_recovery(faults, status: int, log: str, args: list[str], out: Path, old: dict | None) -> None:
    """After a faulted run, continue as a user would and check the output is the reference one."""
    partial = out.parent / f".{out.name}.moequant-partial"
    if partial.exists():
        status, log = faults.run("none", 0, args + ["--resume"])
        assert status == 0, log
    elif not out.exists() or (old is not None and contents(out) == old):
        status, log = faults.run("none", 0, args)  # the fault came before any layer was done
        assert status == 0, log
    assert not partial.exists()


def sweep(faults, kind: str, args_for, base: Path, reference: dict, old: dict | None = None) -> int:
    """Fault a run at event 1, 2, ... until one completes; returns how many events were faulted."""
    for n in range(1, 500):
        out = base / f"{kind}-{n}" / "out"
        out.parent.mkdir(parents=True)
        if old is not None:
            for rel, data in old.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
        status, log = faults.run(kind, n, args_for(out))
        if status == 0:
            assert contents(out) == reference
            return n - 1
        if kind == "enospc":
            assert status == 1, log
            assert_one_line_error(log, "No space left on device")
        else:
            assert status == -signal.SIGKILL, log
        check_recovery(faults, status, log, args_for(out), out, old)
        assert contents(out) == reference, f"{kind} at event {n}: the output differs from an uninterrupted run"
        shutil.rmtree(out.parent)
    raise AssertionError("the run never completed")


def counts(faults, args: list[str], path: Path) -> dict:
    """The renames and writes of an uninterrupted ``moequant ARGS``."""
    status, log = faults.run("none", 0, args, env={"MOEQUANT_FAULT_COUNTS": str(path)})
    assert status == 0, log
    return json.loads(path.read_text())


def test_kill_after_every_rename_then_resume_gives_the_same_bytes(faults, source, reference, tmp_path):
    renames = counts(faults, compress_args(source, tmp_path / "counted"), tmp_path / "counts.json")["renames"]
    assert renames >= 3  # the state after each of the two layers, and the output's publication
    assert sweep(faults, "kill", lambda out: compress_args(source, out), tmp_path, reference) == renames


def test_kill_while_overwriting_never_loses_either_output(faults, source, reference, tmp_path):
    """Under --overwrite the old output is kept until the new one is in place, and put back after a kill."""
    old = {"config.json": b"{}\n", "model.safetensors": b"an earlier output"}
    faulted = sweep(faults, "kill", lambda out: compress_args(source, out, "--overwrite"), tmp_path, reference, old)
    assert faulted >= 4  # the state after each layer, and the two renames of the swap


def test_killed_between_the_swap_renames_puts_the_old_output_back(faults, source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = compress_args(source, out, "--overwrite")
    renames = counts(faults, compress_args(source, tmp_path / "counted"), tmp_path / "counts.json")["renames"]
    status, log = faults.run("kill", renames, args)  # right after OUT moved aside, before the new one moved in
    assert status == -signal.SIGKILL and not out.exists() and (tmp_path / ".out.moequant-old").is_dir(), log
    status, log = faults.run("none", 0, compress_args(source, out))  # without --overwrite: refused, OUT back
    assert_one_line_error(log, "already exists")
    assert "put " + str(out) + " back" in " ".join(log.split()) and (out / "mine.txt").read_text() == "keep me"
    status, log = faults.run("none", 0, args + ["--resume"])
    assert status == 0, log
    assert not (out / "mine.txt").exists() and not (tmp_path / ".out.moequant-old").exists()


@pytest.mark.parametrize("kind", ["enospc", "kill-write"])
def test_fault_in_each_write_of_the_first_layer_and_the_last(faults, source, reference, tmp_path, kind):
    """A full disk (or a kill) part way through a write: one line, and the run resumes to the same bytes."""
    writes = counts(faults, compress_args(source, tmp_path / "counted"), tmp_path / "counts.json")["writes"]
    for n in (1, 2, 3, writes):  # layer 0's shard, its outputs, its state; the last file of the output
        out = tmp_path / f"{kind}-{n}" / "out"
        status, log = faults.run(kind, n, compress_args(source, out))
        if kind == "enospc":
            assert status == 1
            assert_one_line_error(log, "No space left on device", str(out.parent))
        else:
            assert status == -signal.SIGKILL, log
        check_recovery(faults, status, log, compress_args(source, out), out, None)
        assert contents(out) == reference, f"{kind} at write {n}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["enospc", "kill-write"])
def test_fault_in_every_write(faults, source, reference, tmp_path, kind):
    writes = counts(faults, compress_args(source, tmp_path / "counted"), tmp_path / "counts.json")["writes"]
    assert sweep(faults, kind, lambda out: compress_args(source, out), tmp_path, reference) == writes


@pytest.mark.slow
def test_kill_after_every_rename_of_a_longer_run(faults, tmp_path):
    src = add_tokenizer(make_mixtral(tmp_path / "src", seed=4, num_hidden_layers=4, **SMALL))
    out = tmp_path / "reference" / "out"
    status, log = faults.run("none", 0, compress_args(src, out, "--expert-batch", "3"))
    assert status == 0, log
    assert sweep(faults, "kill", lambda o: compress_args(src, o, "--expert-batch", "3"), tmp_path / "sweep",
                 contents(out)) >= 5


# -- one run at a time ------------------------------------------------------------------------------
runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"], ["--overwrite", "--resume"]])
def test_a_second_run_on_the_same_output_is_refused(source, tmp_path, extra):
    out = tmp_path / "out"
    with output_lock(out):
        code, output = cli(*compress_args(source, out, *extra))
    assert code == 1, output
    assert_one_line_error(output, f"another moequant run is writing {out}")
    code, output = cli(*compress_args(source, out, "--method", "rtn"))
    assert code == 0, output  # the lock went with the first run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_process_is_refused_while_the_first_writes(faults, source, tmp_path):
    """Two real processes: the first holds the lock until it is killed, the OS then releases it."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from moequant.checkpoint.writer import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, log = faults.run("none", 0, compress_args(source, out, "--overwrite"))
        assert status == 1
        assert_one_line_error(log, f"another moequant run is writing {out}")
    finally:
        holder.kill()
        holder.wait(timeout=60)
    status, log = faults.run("none", 0, compress_args(source, out))
    assert status == 0, log


def test_read_only_output_folder_is_one_line(source, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere; sysfs refuses even root
        folder = Path("/sys")
    code, output = cli(*compress_args(source, folder / "out"))
    assert_one_line_error(output, f"cannot write {folder}", "not writable; choose another --output")


def test_an_os_error_escaping_a_command_is_one_line(monkeypatch, source, tmp_path):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr("moequant_cli.compress.run_compress", full_disk)
    code, output = cli(*compress_args(source, tmp_path / "out"))
    assert code == 1
    assert_one_line_error(output, f"error: {tmp_path / 'x'}: No space left on device")
    monkeypatch.setenv("MOEQUANT_DEBUG", "1")
    result = runner.invoke(app, compress_args(source, tmp_path / "out"))
    assert isinstance(result.exception, OSError)


# -- damaged resume state -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(source, tmp_path_factory) -> Path:
    """A partial run of ``source`` stopped after its first layer (of two)."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.raises(MoequantError, match="continue with --resume"):
        compress(source, out, calib=CalibSettings(source="random", samples=2, seqlen=16),
                 progress=StopAfterLayers(1))
    return out


def damage_state(folder: Path, data: bytes) -> None:
    (folder / "state.json").write_bytes(data)


def edit_state(folder: Path, **fields) -> None:
    state = json.loads((folder / "state.json").read_text())
    state.update(fields)
    (folder / "state.json").write_text(json.dumps(state))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "state not JSON": lambda r, p: damage_state(r, b'{"fingerprint": '),
    "state not UTF-8": lambda r, p: damage_state(r, b"\xff\xfe"),
    "state a list": lambda r, p: damage_state(r, b"[1, 2]"),
    "layer count a string": lambda r, p: edit_state(r, completed_layers="1"),
    "layer count past the model": lambda r, p: edit_state(r, completed_layers=7),
    "modules a list": lambda r, p: edit_state(r, modules=[]),
    "hidden names another file": lambda r, p: edit_state(r, hidden={"file": "../../x", "bytes": 1}),
    "hidden missing": lambda r, p: (r / "hidden-00001.safetensors").unlink(),
    "hidden truncated": lambda r, p: truncate(r / "hidden-00001.safetensors"),
    "shard missing": lambda r, p: (p / "model-00001-of-00003.safetensors").unlink(),
    "shard truncated": lambda r, p: truncate(p / "model-00001-of-00003.safetensors"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_resume_state_is_one_line(source, stopped, tmp_path, case):
    out = tmp_path / "out"
    for name in (".out.moequant-partial", ".out.moequant-resume"):
        shutil.copytree(stopped.parent / name, tmp_path / name)
    DAMAGE[case](tmp_path / ".out.moequant-resume", tmp_path / ".out.moequant-partial")
    code, output = cli(*compress_args(source, out, "--resume"))
    assert_one_line_error(output, "resume state", "is damaged", "rerun with --overwrite instead of --resume")
    assert not out.exists()
    code, output = cli(*compress_args(source, out, "--overwrite", "--method", "rtn"))  # the advice works
    assert code == 0, output
