"""The Runner interface every backend implements: flat numpy inputs in, named numpy outputs out; and
SubprocessRunner, which runs any of them in a child process (for runtimes that crash rather than raise)."""

from __future__ import annotations

import multiprocessing
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import ExportFailedError, signal_name

Feed = dict[str, np.ndarray]


class Runner(ABC):
    """Runs one artifact. Inputs are copied for every call, so a model that mutates its inputs cannot
    leak state from one run into the next."""

    name: str = "runner"
    precision: str = "fp32"  # selects the parity tolerance

    def __init__(self, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    @abstractmethod
    def infer(self, feed: Feed) -> dict[str, np.ndarray]: ...

    def _check_feed(self, feed: Feed) -> None:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.name}: inputs missing from feed: {missing}")

    def _named(self, outputs: Sequence[torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        if len(outputs) != len(self.output_names):
            raise RuntimeError(f"{self.name}: {len(outputs)} outputs, expected {len(self.output_names)}")
        return {name: (o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o))
                for name, o in zip(self.output_names, outputs)}


class RunnerCrashed(ExportFailedError):
    """A runner's process died on a signal (a bug of the runtime, not of the model): it gave no outputs."""


def _serve(build: Callable[[], Runner], conn: Any) -> None:
    """Child side of SubprocessRunner: builds the runner, then answers feeds until it receives None."""
    try:
        runner = build()
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it there
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while (feed := conn.recv()) is not None:
        try:
            conn.send(("ok", runner.infer(feed)))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", f"{type(err).__name__}: {err}"))


class SubprocessRunner(Runner):
    """Another runner, built and run in a child process (spawned: no forked torch or runtime state). A runtime that
    segfaults (IREE 3.13's on ImVoxelNet) then fails its checks with RunnerCrashed instead of killing autoexport."""

    def __init__(self, build: Callable[[], Runner], name: str, input_names: Sequence[str],
                 output_names: Sequence[str]) -> None:
        super().__init__(input_names, output_names)
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(build, child_conn), daemon=True,
                                        name=f"autoexport-{name}")
        self._process.start()
        child_conn.close()
        self._receive("loading its artifact")

    def _receive(self, doing: str) -> Any:
        try:
            while not self._conn.poll(0.2):
                if not self._process.is_alive():
                    break
            status, value = self._conn.recv()
        except (EOFError, ConnectionError):
            self._process.join(timeout=5)
            code = self._process.exitcode
            how = signal_name(code) if code is not None and code < 0 else f"exit {code}"
            raise RunnerCrashed(f"{self.name} crashed while {doing} ({how}): a bug of the runtime, not of the "
                                "model; its outputs were not produced") from None
        if status == "error":
            raise ExportFailedError(f"{self.name}: {value}")
        return value

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        if not self._process.is_alive():
            raise RunnerCrashed(f"{self.name} crashed on an earlier input; nothing runs it any more")
        self._conn.send({n: feed[n] for n in self.input_names})
        return self._receive("running")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, ConnectionError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_process", None) is not None and not self._conn.closed:
                self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the daemon child is killed anyway
            pass
