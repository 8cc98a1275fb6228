"""`run`'s stage engine: a stage's fingerprint (a hash of everything that decides its outputs), its folder and
``stage.json``, and running or skipping it under one or several processes (README: "Stages are skipped")."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

from ..dist import barrier, is_main_process, main_decides

logger = logging.getLogger(__name__)


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

    def holds_another_runs_work(self, keys: tuple[str, ...], same_run: tuple[str, ...] = ()) -> bool:
        """Whether the folder holds work (finished, or a checkpoint to resume from) of a run whose ``keys``
        inputs differ: starting this stage would delete another run's results. A change in ``same_run`` alone
        (e.g. ``dataset.revision``: the same Hub dataset, changed upstream) is this run's, to redo."""
        state = self._state()
        if not state or state.get("fingerprint") == self.fingerprint:
            return False
        started = bool(state.get("complete")) or any(
            d.startswith("checkpoint-") for d in (os.listdir(self.folder) if os.path.isdir(self.folder) else []))
        return started and any(c.split(".")[0] in keys and c not in same_run for c in self.changed_inputs())

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


def hub_dataset_revision(name: str, revision: str | None = None) -> tuple[str | None, str]:
    """``(commit, where it came from)`` of the Hub dataset ``name`` at ``revision`` (a branch, tag or commit;
    default: ``main``).

    - A 40-hex-digit ``revision`` is the commit itself (``"given"``).
    - Otherwise the Hub is asked (``HfApi().dataset_info(name, revision=...).sha``, ``"hub"``), unless
      ``HF_HUB_OFFLINE`` is set.
    - Offline, or when the Hub cannot answer: the commit of the snapshot that `datasets` cached when it last
      loaded the dataset (its ``README.md`` in the huggingface_hub cache, found with
      ``huggingface_hub.try_to_load_from_cache``, as `datasets` itself finds the commit; ``"cache"``).
    - Else ``(None, why)``.
    """
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision, "given"
    import huggingface_hub
    from huggingface_hub import constants

    problem = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = huggingface_hub.HfApi().dataset_info(name, revision=revision, timeout=10).sha
            if sha:
                return sha, "hub"
            problem = "the Hub gave no commit"
        except Exception as err:  # no network, a missing or gated repo, a bad revision: the cache may know it
            problem = f"the Hub did not answer: {type(err).__name__}"
    try:
        path = huggingface_hub.try_to_load_from_cache(name, "README.md", revision=revision, repo_type="dataset")
    except Exception:  # an id the cache cannot name
        path = None
    if isinstance(path, str):
        return os.path.basename(os.path.dirname(path)), "cache"
    return None, f"{problem}, and no cached snapshot of it was found"


def named_dataset_identity(name: str | None, config: str | None = None, split: str = "train",
                           revision: str | None = None) -> dict:
    """A local file's content hash, a saved dataset's fingerprint, or the Hub id, config, split and the commit
    the dataset is at (`hub_dataset_revision`; ``revision``: a branch, tag or commit, default ``main``), so a
    dataset changed upstream is scored again (with ``requested_revision`` when one was asked for). When the commit
    cannot be found (offline with no cached snapshot, or the Hub does not answer), ``revision`` is None, with a
    warning, and `keep_recorded_revision` keeps a finished stage."""
    if name and os.path.isfile(name):
        return {"file_sha256": _file_sha256(name)}
    if name and os.path.isdir(name):
        state = os.path.join(name, "state.json")
        if os.path.exists(state):
            with open(state) as f:
                return {"saved_fingerprint": json.load(f).get("_fingerprint"), "path": os.path.abspath(name)}
    identity = {"dataset": name, "config": config, "split": split}
    if not name:
        return identity
    sha, source = hub_dataset_revision(name, revision)
    if sha is None:
        logger.warning(f"The commit of Hub dataset {name!r} at {revision or 'main'} is unknown ({source}): its "
                       "identity has no commit, and a change upstream goes unseen until the Hub can be reached.")
    return {**identity, "revision": sha, **({"requested_revision": revision} if revision else {})}


def keep_recorded_revision(identity: dict, folder: str, key: str) -> dict:
    """``identity`` (`named_dataset_identity`) whose commit is unknown takes the one recorded in ``folder``'s
    ``stage.json`` under ``key`` for the same dataset, config, split and requested revision: a finished stage is
    kept, not redone (its outputs deleted) for want of the Hub. Any other identity is returned as it is."""
    if identity.get("dataset") is None or identity.get("revision") is not None:
        return identity
    try:
        with open(os.path.join(folder, "stage.json")) as f:
            before = json.load(f).get("inputs", {}).get(key)
    except (FileNotFoundError, json.JSONDecodeError):
        return identity
    if isinstance(before, dict) and before.get("revision") and {**before, "revision": None} == identity:
        logger.warning(f"Hub dataset {identity['dataset']!r}: taking commit {before['revision']} as before "
                       f"({folder}), since the Hub could not be asked.")
        return {**identity, "revision": before["revision"]}
    return identity
