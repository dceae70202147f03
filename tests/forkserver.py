"""`mdpo` command lines for the tests, forked from one server process that has imported torch, transformers, datasets
and megatron-core once, instead of a fresh interpreter per process (10-13 s of imports each on the 2-core CI
machine, where the suite starts a few hundred of them).

The server (`python forkserver.py SOCKET`, one per pytest worker) forks a launcher per request. The launcher runs
`python -m mdpo ARGS` (or a test worker script) in itself, or forks N workers with torchrun's environment (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, as torchrun does, ends the others when one fails. Output
goes to the files the client names; the exit code comes back over the socket. What needs torchrun itself (its
launcher killed, its signals forwarded) is started by those tests with torchrun; on a machine with CUDA (a process
with a CUDA context cannot be forked safely) every command runs in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import socket
import sys
import time

_POLL_S = 0.05


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_mdpo(argv: list[str]) -> int:
    """`python -m mdpo ARGV` in this process (`python SCRIPT ARGS` when ARGV starts with a .py file): its exit
    code."""
    import runpy

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    script = argv[0] if argv and argv[0].endswith(".py") else None
    sys.argv = [script or "mdpo", *argv[1 if script else 0 :]]
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module("mdpo", run_name="__main__", alter_sys=True)
    except SystemExit as end:
        code = end.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _workers(argv: list[str], nproc: int) -> int:
    """N forked workers with torchrun's variables; the first failure ends the others (as torchrun does)."""
    port, pids = str(_free_port()), []
    for rank in range(nproc):
        env = dict(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        pid = os.fork()
        if pid == 0:
            os.environ.update(env)
            _exit(_run_mdpo(argv))
        pids.append(pid)
    worst = 0
    while pids:
        pid, status = os.wait()
        if pid not in pids:
            continue
        pids.remove(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and worst == 0:
            worst = code if code > 0 else 1
            for other in pids:
                os.kill(other, signal.SIGTERM)
    return worst


def _exit(code: int) -> None:
    """End a forked process as an interpreter would end: atexit's functions first (multiprocessing shuts down the
    Manager process Megatron's checkpoint writer spawned; otherwise it outlives the run), then the streams."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _launch(conn: socket.socket, request: dict) -> None:
    """The launcher (a forked child of the server): its own process group, the request's directory, environment
    and output files, then the command."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # a fresh file, or a client's /proc/PID/fd/N
        os.dup2(file, fd)
        os.close(file)
    nproc = request["nproc"]
    code = _run_mdpo(request["argv"]) if nproc == 1 else _workers(request["argv"], nproc)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    conn.sendall(json.dumps({"code": code}).encode() + b"\n")
    os._exit(0)


def _results_queue_of_this_process():
    """dist_checkpointing's writer hands its results back through a queue (megatron-core's
    `filesystem_async._get_write_results_queue`): a Manager it spawns on the first save of each process, a fresh
    interpreter that takes ~2 s of the 2-core machine per command. mdpo saves synchronously, so the results never
    leave the process that wrote them: forked commands use a queue of their own. What runs under torchrun itself
    keeps Megatron's Manager."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    return filesystem_async._results_queue


def serve(path: str) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    import mdpo.cli  # noqa: F401 - the imports every forked command shares

    filesystem_async._get_write_results_queue = _results_queue_of_this_process

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are never waited for: reaped by the kernel
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request = json.loads(conn.makefile().readline())
        if os.fork() == 0:
            server.close()
            _launch(conn, request)
        conn.close()


class ForkServer:
    """The client side: one server per pytest worker, started on first use."""

    def __init__(self, env: dict[str, str]) -> None:
        import subprocess
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="mdpo_forkserver_")
        self.socket = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.socket], env=env, stdout=subprocess.PIPE, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the test fork server did not start")
        self.numbers = itertools.count()  # output file names, unique across threads

    def run(self, argv: list[str], env: dict[str, str], cwd: str, nproc: int, timeout: float):
        """(exit code, stdout, stderr) of `mdpo ARGV` forked with `env`; the launcher's process group is killed
        on timeout (subprocess.TimeoutExpired)."""
        number = next(self.numbers)
        out, err = (os.path.join(self.folder, f"{number}.{name}") for name in ("out", "err"))
        code = request(self.socket, argv, env, cwd, nproc, timeout, out, err)
        texts = []
        for path in (out, err):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            os.unlink(path)
        return code, texts[0], texts[1]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def request(
    path: str, argv: list[str], env: dict[str, str], cwd: str, nproc: int, timeout: float, stdout: str, stderr: str
) -> int:
    """The exit code of `mdpo ARGV` (N workers with torchrun's environment when nproc > 1) forked by the server at
    socket `path`, its output written to the files (or /proc/PID/fd/N) named; the launcher's process group is killed
    on timeout (subprocess.TimeoutExpired)."""
    import subprocess

    message = dict(argv=argv, env=env, cwd=str(cwd), nproc=nproc, stdout=stdout, stderr=stderr)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.sendall(json.dumps(message).encode() + b"\n")
        reader = conn.makefile()
        pid = json.loads(reader.readline())["pid"]
        conn.settimeout(timeout)
        try:
            line = reader.readline()
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(["mdpo", *argv], timeout) from None
    code = json.loads(line)["code"] if line else -signal.SIGKILL  # the launcher died without a word
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # the launcher's last flush and exit
        time.sleep(_POLL_S)
    return code


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    serve(sys.argv[1])
