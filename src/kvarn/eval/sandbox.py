"""Run untrusted generated Python (HumanEval completions) in a separate, restricted subprocess.

Nothing generated ever runs in the evaluating process. Each program runs in a fresh interpreter
(``python -I -B``: isolated mode, no user site, no bytecode writes) with a fresh temporary
directory as its working directory, HOME and TMPDIR, a minimal environment, stdin closed after
the handshake, and stdout/stderr captured to files (bounded by the file-size limit).

Layers of containment, outermost first:

1. **Network namespace** (kernel-enforced): when ``unshare -rn`` works on this machine (Linux with
   unprivileged user namespaces, or root), the interpreter runs in a new user + network namespace
   with no interface but a down loopback: nothing is reachable. Probed once per process; the
   result is reported in ``Sandbox.describe()``. Where it does not work (macOS, hardened CI
   kernels) only layer 3 blocks sockets.
2. **Resource limits** (kernel-enforced, ``setrlimit`` in the child): address space
   (``memory_mb``), CPU seconds, file size (``max_file_mb``, which also bounds captured output),
   core dumps off, and ``RLIMIT_NPROC`` for non-root users. A wall-clock timeout kills the whole
   process group.
3. **Audit hook** (Python-level, ``sys.addaudithook``, cannot be removed once installed): refuses
   writes, deletions, renames, permission changes and directory creation outside the temporary
   directory; every way of starting a process (``os.fork``, ``os.system``, ``subprocess``,
   ``os.exec*``, ``os.posix_spawn``, ``pty``) -- so a fork bomb raises instead of forking, which
   matters because ``RLIMIT_NPROC`` does not bind root; sending signals; every socket; and loading
   native code through ``ctypes``. Python-level hooks can be bypassed by native code, which is why
   layers 1 and 2 exist; they do stop the plain-Python mistakes and misbehaviour that model-written
   code produces.

A program passes only if it returns normally and the harness then prints a random per-run token:
``sys.exit(0)`` / ``os._exit(0)`` inside a completion cannot fake a pass.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Runs inside the child interpreter before the untrusted program. argv: program path, sandbox dir, limits.
_BOOTSTRAP = r"""
import os, sys
def _kvarn_sandbox_main():
    import resource, traceback
    program, root, memory_mb, cpu_s, file_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    MB = 1024 * 1024
    for limit, value in ((resource.RLIMIT_AS, memory_mb * MB), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_FSIZE, file_mb * MB), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if os.getuid() != 0:  # RLIMIT_NPROC counts the user's processes and does not bind root
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    root = os.path.realpath(root) + os.sep
    report = os.dup(1)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec", "subprocess.Popen",
               "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
               "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
               "ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof", "ctypes.call_function"}
    blocked_imports = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket"}
    path_events = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "os.chflags", "os.setxattr", "os.removexattr",
                   "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move",
                   "os.mkfifo", "os.mknod"}
    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real + os.sep == root or real.startswith(root) or real == "/dev/null"
    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in blocked_imports:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_events:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the sandbox directory")
    with open(program, encoding="utf-8") as handle:
        code = compile(handle.read(), program, "exec")
    sys.addaudithook(hook)
    try:
        exec(code, {"__name__": "__main__", "__file__": program})
    except SystemExit as exc:
        sys.stderr.write(f"sandbox: the program called exit({exc.code!r}) before finishing\n")
        sys.stderr.flush()
        os._exit(3)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(report, ("\nKVARN-SANDBOX-DONE " + nonce + "\n").encode())
    os._exit(0)
_kvarn_sandbox_main()
"""

MARKER = "KVARN-SANDBOX-DONE"


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout | exited
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` can start a process in a fresh network namespace here."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        probe = subprocess.run(
            [
                unshare,
                "-rn",
                "--",
                sys.executable,
                "-I",
                "-c",
                "import socket; print(len(socket.if_nameindex()))",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    # A fresh network namespace has exactly one interface: the loopback, down.
    return probe.returncode == 0 and probe.stdout.strip() == "1"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", errors="replace")
    return ("[...]" + text) if len(data) > limit else text


class Sandbox:
    """Executes Python programs in restricted child processes (see the module docstring)."""

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_file_mb: int = 16,
        use_network_namespace: bool | None = None,
        workers: int = 2,
    ):
        if timeout <= 0 or memory_mb < 64 or max_file_mb < 1 or workers < 1:
            raise ValueError(
                f"bad sandbox limits: timeout={timeout}, memory_mb={memory_mb}, max_file_mb={max_file_mb}, "
                f"workers={workers}"
            )
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_file_mb = max_file_mb
        self.workers = workers
        self.network_namespace = (
            network_namespace_available() if use_network_namespace is None else use_network_namespace
        )

    def describe(self) -> dict:
        return {
            "process": "separate interpreter per program (python -I -B), fresh temporary directory as cwd/HOME/TMPDIR",
            "timeout_s": self.timeout,
            "memory_mb": self.memory_mb,
            "max_file_mb": self.max_file_mb,
            "workers": self.workers,
            "network": "unshare -rn (new network namespace) + audit hook"
            if self.network_namespace
            else "audit hook only (unshare -rn unavailable)",
            "writes_outside_tmp": "refused by audit hook",
            "processes": "fork/exec/spawn refused by audit hook"
            + ("" if os.getuid() == 0 else " + RLIMIT_NPROC"),
        }

    def run(self, program: str) -> ExecutionResult:
        nonce = secrets.token_hex(16)
        started = time.monotonic()
        with (
            tempfile.TemporaryDirectory(prefix="kvarn-sandbox-") as root,
            tempfile.TemporaryDirectory(prefix="kvarn-sandbox-io-") as io_dir,
        ):
            program_path = Path(root) / "program.py"
            program_path.write_text(program, encoding="utf-8")
            cmd = [
                sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(program_path), root,
                str(self.memory_mb), str(int(self.timeout) + 1), str(self.max_file_mb),
            ]  # fmt: skip
            if self.network_namespace:
                cmd = [shutil.which("unshare") or "unshare", "-rn", "--", *cmd]
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": root,
                "TMPDIR": root,
                "LANG": "C.UTF-8",
                "PYTHONHASHSEED": "0",
            }
            out_path, err_path = Path(io_dir) / "stdout", Path(io_dir) / "stderr"
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=root,
                    env=env,
                    start_new_session=True,
                )
                timed_out = False
                try:
                    proc.communicate(input=(nonce + "\n").encode(), timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    self._kill_group(proc)
            stdout, stderr = _tail(out_path), _tail(err_path)
        seconds = time.monotonic() - started
        lines = stdout.rstrip("\n").splitlines()
        finished = proc.returncode == 0 and bool(lines) and lines[-1] == f"{MARKER} {nonce}"
        if finished:
            stdout = "\n".join(lines[:-1])
        status = (
            "passed"
            if finished
            else "timeout"
            if timed_out
            else "exited"
            if proc.returncode == 3
            else "failed"
        )
        return ExecutionResult(finished, status, proc.returncode, seconds, stdout, stderr)

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        """Kill the child's whole process group (it leads its own session) and reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            pass

    def run_many(self, programs: list[str]) -> list[ExecutionResult]:
        """Run programs concurrently (``workers`` at a time); results in input order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.run, programs))
