"""Python command lines for the tests, in processes forked from a pre-warmed server.

A test that runs ``python -m taohooks.cli ...`` or ``python SCRIPT.py ...`` paid ~6 s of CPU importing torch,
torch._dynamo and diffusers before the command's first line: 150 such processes made most of the suite's time on
2 cores. ``run_python`` runs them in a child forked from ``fixtures/prewarmed_runner.py`` (one server per test
process, started at the first command), which has imported only those (see its docstring for what the child
does as the interpreter would). What a fork cannot be is kept a fresh interpreter (``cold``):

* ``-c CODE`` and interpreter options (start-up itself is what those test);
* an environment that sets ``TAOHOOKS_CONFIG`` (the autoload ``.pth`` acts at start-up) or differs from the
  server's in a variable read at start-up (``_STARTUP_PREFIXES``: ``PYTHON*``, ``PYTORCH*``, ``HF_*``, locale, ...;
  but ``PYTHONPATH`` and the thread counts, which the child applies);
* ``TAOHOOKS_TEST_COLD=1``, and systems without ``fork``.
Tests that signal a process, or run two at once, start it with ``subprocess`` themselves.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

SERVER = Path(__file__).parent / "fixtures" / "prewarmed_runner.py"
# fork() after importing torch is fine on Linux (no CUDA, no OpenMP pool started in the server)
COLD = bool(os.environ.get("TAOHOOKS_TEST_COLD")) or not hasattr(os, "fork") or sys.platform != "linux"
TIMEOUT = 300
# what the interpreter, torch, numpy, huggingface_hub or diffusers read when the server imports them: a command whose
# environment differs in one of these runs cold (but PYTHONPATH and the thread counts, which the child applies)
_STARTUP_PREFIXES = ("PYTHON", "TORCH", "PYTORCH", "CUDA", "MKL", "OMP_", "KMP_", "OPENBLAS", "HF_", "HUGGINGFACE",
                     "DIFFUSERS", "TRANSFORMERS", "LD_", "LC_", "LANG")
_APPLIED = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def base_env(**extra: str) -> Dict[str, str]:
    """This process's environment without taohooks' variables and PYTHONPATH, one thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOHOOKS_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def _server_env() -> Dict[str, str]:
    # no thread count: the server's own is then the default, and each child sets the one its command asks for
    return {k: v for k, v in base_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _new_file(folder: str, suffix: str) -> Path:
    handle, path = tempfile.mkstemp(dir=folder, suffix=f".{suffix}")
    os.close(handle)
    return Path(path)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def summaries(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("taohooks: generation")]


class Runner:
    """Runs one command line per process: forked from the pre-warmed server, or cold."""

    def __init__(self, cold: bool = COLD):
        self.cold, self.server = cold, None
        self._outputs, self._env = None, None

    def _start(self) -> None:
        self._outputs, self._env = tempfile.mkdtemp(prefix="taohooks-prewarmed-"), _server_env()
        self.server = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=self._env, cwd=str(SERVER.parent))
        ready = self.server.stdout.readline().strip()
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the pre-warmed runner did not start (said {ready!r})")

    def needs_cold(self, argv: Sequence[str], env: Mapping[str, str]) -> bool:
        if (self.cold or not argv or (argv[0].startswith("-") and argv[0] != "-m") or env.get("TAOHOOKS_CONFIG")
                or argv[:2] == ["-m", "torch.distributed.run"]):  # (torchrun: its agent and signals, as they are)
            return True
        server = self._env if self.server is not None else _server_env()
        keys = {k for k in (*env, *server) if k.startswith(_STARTUP_PREFIXES) and k not in _APPLIED}
        return any(env.get(k) != server.get(k) for k in keys)

    def __call__(self, argv: Sequence, cwd, env: Optional[Mapping[str, str]] = None, cold: Optional[bool] = None,
                 timeout: float = TIMEOUT) -> Result:
        argv = [str(a) for a in argv]
        env = dict(os.environ if env is None else env)
        if cold or (cold is None and self.needs_cold(argv, env)):
            res = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                                 timeout=timeout)
            return Result(res.returncode, res.stdout, res.stderr)
        if self.server is not None and self.server.poll() is not None:
            self.close()  # (it died after its last command: start another)
        if self.server is None:
            self._start()
        out, err = (_new_file(self._outputs, name) for name in ("out", "err"))  # (a pair per command)
        request = dict(argv=argv, cwd=str(Path(cwd or os.getcwd()).resolve()), env=env, stdout=str(out),
                       stderr=str(err), timeout=timeout)
        try:
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            answer = self.server.stdout.readline()
        except OSError:
            answer = ""
        if not answer:
            self.close()  # (the next command starts another)
            raise RuntimeError(f"the pre-warmed runner died running {argv}")
        answer = json.loads(answer)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink(), err.unlink()
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
        return Result(answer["rc"], stdout, stderr)

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.stdin.close()
            except OSError:  # (a server that died)
                pass
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None
        if self._outputs is not None:
            import shutil

            shutil.rmtree(self._outputs, ignore_errors=True)
            self._outputs = None


RUNNER = Runner()  # (one server per test process)
atexit.register(RUNNER.close)


def run_python(argv: Sequence, cwd=None, env: Optional[Mapping[str, str]] = None, timeout: float = TIMEOUT,
               cold: Optional[bool] = None) -> Result:
    """``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``, forked from the pre-warmed server where a fork is the same (see the module's docstring)."""
    return RUNNER(argv, cwd, env, cold=cold, timeout=timeout)
