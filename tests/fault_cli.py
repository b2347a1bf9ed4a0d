"""The moequant CLI with one file-system fault injected, for crash-consistency tests.

    python -m tests.fault_cli KIND N ARG...   run ``moequant ARG...`` with fault KIND at event N
    python -m tests.fault_cli serve           read one JSON request a line from stdin, run each in
                                              a forked child, answer one JSON line each

KIND is one of:

- ``kill``: SIGKILL the process right after its Nth rename (``os.replace``, ``os.rename``,
  ``Path.replace``, ``Path.rename``);
- ``kill-write``: SIGKILL it in the middle of its Nth file write (half the file written);
- ``enospc``: its Nth file write stops half way with "No space left on device", as the
  operating system (or safetensors, for its files) reports it;
- ``none``: no fault.

File writes are safetensors files (``save_file``), ``Path.write_text``/``write_bytes`` and
``shutil.copyfile``. A run that ends by itself writes ``{"renames": R, "writes": W}`` (the events
it saw) to the file named by ``MOEQUANT_FAULT_COUNTS``, if set.

A served request is ``{"kind": ..., "n": ..., "args": [...], "log": PATH}`` (and optionally
``"env": {...}``, set in the run's environment); the answer is
``{"status": S}``, the exit status of the run or minus the signal that ended it, with its stdout
and stderr in ``PATH``. Forking from a process that has imported torch and moequant once makes
each run take a fraction of a second instead of several.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import traceback

import safetensors.torch
from safetensors import SafetensorError

KINDS = ("kill", "kill-write", "enospc", "none")


class Faults:
    """Counts renames and writes and injects the fault ``kind`` at event ``n``."""

    def __init__(self, kind: str, n: int) -> None:
        if kind not in KINDS:
            raise SystemExit(f"unknown fault {kind!r}; use one of {', '.join(KINDS)}")
        self.kind, self.n = kind, n
        self.renames = self.writes = 0

    def renamed(self) -> None:
        self.renames += 1
        if self.kind == "kill" and self.renames == self.n:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, path: str | os.PathLike, write_whole, make_error) -> object:
        """Run ``write_whole()``, or at the Nth write leave half of its bytes at ``path`` and fail."""
        self.writes += 1
        if self.writes != self.n or self.kind not in ("kill-write", "enospc"):
            return write_whole()
        with tempfile.TemporaryDirectory() as scratch:
            whole = os.path.join(scratch, "whole")
            write_whole(whole)
            data = pathlib.Path(whole).read_bytes()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        if self.kind == "kill-write":
            os.kill(os.getpid(), signal.SIGKILL)
        raise make_error(str(path))


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _safetensors_enospc(path: str) -> SafetensorError:
    reason = os.strerror(errno.ENOSPC)
    return SafetensorError(f'Error while serializing: I/O error: {reason} (os error {errno.ENOSPC}) at path "{path}"')


def install(faults: Faults) -> None:
    """Patch the rename and write functions every loaded module uses to report to ``faults``."""
    os_replace, os_rename = os.replace, os.rename
    save_file, copyfile = safetensors.torch.save_file, shutil.copyfile
    write_text, write_bytes = pathlib.Path.write_text, pathlib.Path.write_bytes

    def counted(rename):
        def wrapper(*args, **kwargs):
            result = rename(*args, **kwargs)
            faults.renamed()
            return result
        return wrapper

    def path_rename(rename):
        def method(self, target):
            rename(self, target)
            faults.renamed()
            return type(self)(target)
        return method

    def patched_save_file(tensors, filename, metadata=None):
        return faults.write(filename, lambda to=filename: save_file(tensors, to, metadata), _safetensors_enospc)

    def patched_copyfile(src, dst, *args, **kwargs):
        return faults.write(dst, lambda to=dst: copyfile(src, to, *args, **kwargs), _enospc)

    def patched_write_text(self, data, *args, **kwargs):
        return faults.write(self, lambda to=self: write_text(pathlib.Path(to), data, *args, **kwargs), _enospc)

    def patched_write_bytes(self, data):
        return faults.write(self, lambda to=self: write_bytes(pathlib.Path(to), data), _enospc)

    os.replace, os.rename = counted(os_replace), counted(os_rename)
    pathlib.Path.replace, pathlib.Path.rename = path_rename(os_replace), path_rename(os_rename)
    pathlib.Path.write_text, pathlib.Path.write_bytes = patched_write_text, patched_write_bytes
    shutil.copyfile = patched_copyfile
    for module in list(sys.modules.values()):
        if getattr(module, "save_file", None) is save_file:
            module.save_file = patched_save_file


def run(kind: str, n: int, args: list[str]) -> int:
    """Run ``moequant ARGS`` with the fault installed; returns its exit status."""
    from moequant_cli.main import app

    faults = Faults(kind, n)
    install(faults)
    try:
        app(args=args, prog_name="moequant")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback is what the tests look for
        traceback.print_exc()
        code = 1
    counts = os.environ.get("MOEQUANT_FAULT_COUNTS")
    if counts:
        pathlib.Path(counts).write_bytes(json.dumps({"renames": faults.renames, "writes": faults.writes}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    # imported once here, shared by every forked run (nothing is computed before the fork)
    import transformers

    import moequant.compression  # noqa: F401
    import moequant_cli.main  # noqa: F401

    transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast  # noqa: B018 - resolves the lazy imports

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ.update(request.get("env", {}))
                code = run(request["kind"], request["n"], request["args"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    else:
        sys.exit(run(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
