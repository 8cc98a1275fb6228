"""`run`'s stage engine: a stage's fingerprint (a hash of everything that decides its outputs), its folder and
``stage.json``, and running or skipping it under one or several processes (README: "Stages are skipped")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

from ..dist import barrier, is_main_process, main_decides


def fingerprint(inputs: dict) -> str:
    """A short, stable hash of JSON-able ``inputs`` (keys sorted)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One stage's folder and fingerprint; `done` says whether it can be skipped."""

    name: str
    folder: str
    inputs: dict

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    def _state(self) -> dict:
        try:
            with open(os.path.join(self.folder, "stage.json")) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def done(self) -> bool:
        state = self._state()
        return bool(state.get("complete")) and state.get("fingerprint") == self.fingerprint

    def changed_inputs(self) -> list[str]:
        """The inputs that differ from those of the run that wrote the folder, one level into dicts
        (``proxy.learning_rate``)."""
        before = self._state().get("inputs", {})
        now = json.loads(json.dumps(self.inputs, default=str))
        changed = []
        for key in sorted(set(before) | set(now)):
            a, b = before.get(key), now.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                changed.append(key)
        return changed

    def holds_another_runs_work(self, keys: tuple[str, ...]) -> bool:
        """Whether the folder holds work (finished, or a checkpoint to resume from) of a run whose ``keys``
        inputs differ: starting this stage would delete another run's results."""
        state = self._state()
        if not state or state.get("fingerprint") == self.fingerprint:
            return False
        started = bool(state.get("complete")) or any(
            d.startswith("checkpoint-") for d in (os.listdir(self.folder) if os.path.isdir(self.folder) else []))
        return started and any(c.split(".")[0] in keys for c in self.changed_inputs())

    def start(self) -> None:
        """Mark the stage started; outputs of *other* inputs in its folder are removed first."""
        state = self._state()
        if (state and state.get("fingerprint") != self.fingerprint and os.path.isdir(self.folder)
                and is_main_process()):
            print(f"[{self.name}] inputs changed since the last run ({', '.join(self.changed_inputs())}): "
                  f"starting {self.folder} afresh")
            shutil.rmtree(self.folder)
        self._write(complete=False)

    def finish(self, **outputs) -> None:
        self._write(complete=True, **outputs)

    def _write(self, **state) -> None:
        if not is_main_process():
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "stage.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"stage": self.name, "fingerprint": self.fingerprint, "inputs": self.inputs,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **state}, f, indent=1, default=str)
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written stage.json


def run_stage(stage: Stage, work, statuses: dict, every_rank: bool = False) -> dict:
    """Skip ``stage`` if done, else run ``work()`` (returns a dict of outputs to record). Returns its state.

    Under several processes every process calls this for every stage, in the same order: rank 0
    decides whether it is done and tells the others (`dist.main_decides`), and ``work`` runs on
    every process when ``every_rank`` (the training stages: scoring, fine-tuning), else on rank 0
    alone while the others wait at the next stage's barrier (within the process group's timeout,
    ``--ddp_timeout``, 1800 s by default: raise it when rank 0's own work, such as ``--extra_scores
    ifd`` with a large model, takes longer).
    """
    done = main_decides(stage.done)
    main = is_main_process()
    if done:
        if main:
            print(f"[{stage.name}] up to date, skipped ({stage.folder})")
        statuses[stage.name] = "skipped"
        return stage._state()
    if main:
        print(f"[{stage.name}] running -> {stage.folder}")
    stage.start()
    barrier()  # the folder is clean before anyone writes to it
    t0 = time.time()
    outputs = (work() if every_rank or main else None) or {}
    stage.finish(seconds=round(time.time() - t0, 1), **outputs)
    statuses[stage.name] = "ran"
    return stage._state()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def named_dataset_identity(name: str | None, config: str | None = None, split: str = "train") -> dict:
    """A local file's content hash, a saved dataset's fingerprint, or the Hub id, config and split."""
    if name and os.path.isfile(name):
        return {"file_sha256": _file_sha256(name)}
    if name and os.path.isdir(name):
        state = os.path.join(name, "state.json")
        if os.path.exists(state):
            with open(state) as f:
                return {"saved_fingerprint": json.load(f).get("_fingerprint"), "path": os.path.abspath(name)}
    return {"dataset": name, "config": config, "split": split}
