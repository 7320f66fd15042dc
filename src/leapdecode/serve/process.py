"""Run `leapdecode serve` as a child process: start it on a free port, know when it is ready, stop it.

Used by the load generator (`leapdecode loadgen --model ...`) and by the server tests. Readiness is an event, not a
guess: the server is started with `--port 0` (the OS picks a free port, so there is no race for it), and a reader
thread watches its log for uvicorn's "Uvicorn running on http://HOST:PORT" line, which uvicorn prints after the
application's start-up (model loaded, scheduler calibrated) has completed. The reader keeps draining the log so the
child can never block on a full pipe; `log` holds everything it printed (useful in a failing test's message).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

_READY = re.compile(r"Uvicorn running on (http://\S+)")


class ServerProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        """`args`: the options after `leapdecode serve` (--port is set to 0 and --host defaults to 127.0.0.1)."""
        args = list(args)
        if "--host" not in args:
            args += ["--host", "127.0.0.1"]
        args += ["--port", "0", "--log-level", "info"]
        command = [sys.executable, "-m", "leapdecode.cli", "serve", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, bufsize=1)
        self.log: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            match = _READY.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended: wake any waiter

    def wait_ready(self, timeout: float = 600.0) -> str:
        """Block until the server listens (returns its base URL); RuntimeError with its log if it died or timed out."""
        if not self._ready.wait(timeout) or self.url is None:
            self.stop(timeout=10)
            raise RuntimeError(f"the server did not start within {timeout:.0f} s (exit code {self.proc.returncode});"
                               f" its log:\n" + "\n".join(self.log[-60:]))
        return self.url

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
