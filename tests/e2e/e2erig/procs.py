"""Background processes of the rig: started in a namespace, logged to files, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from e2erig.netns import Netns


class Proc:
    """One long-running server process with its output in a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def dead(self) -> str | None:
        """None while running, else why it is gone (with the end of its log)."""
        code = self.popen.poll()
        if code is None:
            return None
        return f"{self.name} exited with {code}; log tail:\n{self.tail()}"

    def tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n_chars:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; the whole process group, which we created."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(timeout=10)


class Supervisor:
    """Starts processes and remembers them so teardown stops each, newest first."""

    def __init__(self, log_dir: Path, base_env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.base_env = dict(base_env)
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        ns: Netns | None,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start `argv` in its own process group (so stop() reaches its children too)."""
        log = self.log_dir / f"{name}.log"
        full_env = dict(self.base_env)
        if env:
            full_env.update(env)
        cmd = ns.argv(argv) if ns is not None else list(argv)
        with log.open("ab") as fh:
            popen = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=cwd, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> list[str]:
        problems: list[str] = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # teardown must go on whatever one process does
                problems.append(f"stopping {proc.name}: {exc!r}")
        self.procs.clear()
        return problems


def wait_for(what: str, check: Callable[[], bool], *, deadline_s: float = 20.0,
             alive: Callable[[], str | None] | None = None, step_s: float = 0.05) -> None:
    """Poll `check` until it is true; raise with `what` at the deadline or if a server died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"waiting for {what}: {dead}")
        if check():
            return
        time.sleep(step_s)
    raise TimeoutError(f"{what}: not ready after {deadline_s}s")
