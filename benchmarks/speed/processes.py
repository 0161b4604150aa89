"""Where the workers run: each system in its own spawned process (:class:`ProcessWorker`, the
default ``--isolation process``: clean memory figures) or in this process on one shared model
(:class:`InProcessWorker`); both are called as ``worker.call(command, **kwargs)``."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from blue_plugin.model.loading import load_model

from benchmarks.speed.config import SpeedConfig
from benchmarks.speed.easyedit_worker import EasyEditWorker
from benchmarks.speed.workers import OursWorker, WorkerBase

WORKERS = {"ours": OursWorker, "easyedit": EasyEditWorker}


def worker_entry(conn, system: str, cfg: SpeedConfig, log_path: str) -> None:
    """Body of a worker process: build the worker, then answer ``(command, kwargs)`` messages
    with ``("ok", result)`` or ``("error", traceback)`` until ``None`` arrives."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["BLUE_PLUGIN_NO_EASYEDIT"] = "1"  # never import EasyEdit implicitly (the ours worker)
    if "fork" in mp.get_all_start_methods():
        # a spawned child inherits 'spawn' as its default; EasyEdit's data loader (local collate
        # function) needs the platform default, as in a normal EasyEdit run
        mp.set_start_method("fork", force=True)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{system}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        kwargs = {"log_dir": str(Path(log_path).parent)} if system == "easyedit" else {}
        worker = WORKERS[system](cfg, **kwargs)
        conn.send(("ok", worker.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            cmd, kwargs = msg
            try:
                conn.send(("ok", getattr(worker, cmd)(**kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        worker.close()


class WorkerError(RuntimeError):
    """A worker failed; the message carries its traceback."""


class ProcessWorker:
    """A worker in its own (spawned) process, called like the in-process one."""

    def __init__(self, system: str, cfg: SpeedConfig, log_path: Path, python: Optional[str] = None):
        ctx = mp.get_context("spawn")
        self.system, self.log_path = system, log_path
        self.conn, child = ctx.Pipe()
        if python:
            ctx.set_executable(python)
        try:
            self.proc = ctx.Process(target=worker_entry, args=(child, system, cfg, str(log_path)), daemon=False)
            self.proc.start()
        finally:
            if python:
                ctx.set_executable(sys.executable)
        child.close()
        self.info = self._receive("start")

    def _receive(self, what: str) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise WorkerError(f"the {self.system} worker died during {what}; see {self.log_path}:\n{log_tail(self.log_path)}") from None
        if status != "ok":
            raise WorkerError(f"{self.system} worker failed during {what}:\n{payload}")
        return payload

    def call(self, cmd: str, **kwargs) -> Any:
        self.conn.send((cmd, kwargs))
        return self._receive(cmd)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)


class InProcessWorker:
    def __init__(self, worker: WorkerBase):
        self.worker, self.system = worker, worker.system
        self.info = worker.info()

    def call(self, cmd: str, **kwargs) -> Any:
        try:
            return getattr(self.worker, cmd)(**kwargs)
        except Exception:
            raise WorkerError(f"{self.system} failed during {cmd}:\n{traceback.format_exc()}") from None

    def close(self) -> None:
        self.worker.close()


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_workers(cfg: SpeedConfig, log_dir: Path) -> dict[str, Any]:
    systems = ["ours"] + (["easyedit"] if cfg.easyedit_root else [])
    workers: dict[str, Any] = {}
    try:
        if cfg.isolation == "process":
            for s in systems:
                py = cfg.ee_python if s == "easyedit" else None
                workers[s] = ProcessWorker(s, cfg, log_dir / f"worker-{s}.log", py)
        else:
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            model, tok = load_model(cfg.model)
            for s in systems:
                kwargs = {"log_dir": str(log_dir)} if s == "easyedit" else {}
                workers[s] = InProcessWorker(WORKERS[s](cfg, model, tok, **kwargs))
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers
