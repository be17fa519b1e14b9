"""What a training run is, kept in its work directory, and what a resume checks against it.

``<workdir>/run.json`` (written by process 0 at every start) holds

* ``identity``: what the checkpoints are trained *on* and their shape.  A resume whose identity
  differs is refused (:class:`RunIdentityError`, one line per difference, ``key: recorded ->
  now``) unless ``train.resume_override=True``; the override is then recorded under
  ``resume_overrides`` (time and differences).  It holds the student's content fingerprint
  (:func:`regift_jax.models.fingerprint.model_fingerprint`), the data selection (the sha256 of
  the source files, i.e. the trace shards the ``regift_traces`` builder is built from or a JSONL
  path reads, or the SQuAD-v2 file; selection, criterion, SQuAD split, held-out split,
  ``max_examples``, ``seed``) and the shape of the train state (LoRA on/off, rank, targets,
  master dtype), which no checkpoint of another shape could be restored into;
* ``settings``: every other value that changes what training computes (:data:`SETTINGS`:
  optimiser, steps, batch, lengths, packing, prompt template, LoRA alpha/dropout, compute
  dtype ...).  Every checkpoint stores them too; a resume whose settings differ from the
  restored checkpoint's goes ahead and logs a warning listing each ``key: checkpoint -> now``.

A run is *finished* (:func:`finished`) when ``result.json`` records its last step, not a
preemption, with this identity and these settings, and the final checkpoint is still on disk as
it was written (file names and sizes); training then does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
from jax.experimental import multihost_utils

from regift_jax.core import configs_util
from regift_jax.core.io import atomic_write_json
from regift_jax.models.fingerprint import model_fingerprint
from regift_jax.training import examples
from regift_jax.training.checkpointing import step_signature, steps_on_disk
from regift_jax.training.state import resolve_model_source

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RESULT_FILE = "result.json"

#: The config values (``section.key``) a resume may change with a warning.
SETTINGS = (
    "model.dtype", "model.remat_policy", "model.attention_chunk", "model.loss_chunk",
    "model.attention_impl", "lora.alpha", "lora.dropout",
    "data.template", "data.chat_template", "data.seq_len", "data.batch_unit", "data.packing",
    "data.max_open_rows", "data.overlong", "data.boundary", "data.add_bos", "data.add_eos",
    "data.shuffle", "data.epoch_boundary",
    "train.global_batch", "train.grad_accum_steps", "train.micro_batch", "train.num_steps",
    "train.num_epochs", "train.max_nonfinite_in_a_row",
    "optim.learning_rate", "optim.schedule", "optim.warmup_fraction", "optim.warmup_steps",
    "optim.end_lr_fraction", "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay",
    "optim.no_decay", "optim.clip_norm",
)


class RunIdentityError(ValueError):
    """The work directory holds checkpoints of another model or other data."""


def _jsonable(v):
    return json.loads(json.dumps(v))  # tuples -> lists, as they read back from a file


def settings(config) -> Dict[str, Any]:
    """``{"section.key": value}`` of :data:`SETTINGS`."""
    out = {}
    for key in SETTINGS:
        section, name = key.split(".")
        out[key] = _jsonable(config[section][name])
    return out


def data_identity(dcfg) -> Dict[str, Any]:
    """The data selection of the ``data`` section, with the digest of its source files."""
    d = {"kind": str(dcfg.kind), "source_digest": examples.source_digest(dcfg),
         "eval_fraction": float(dcfg.eval_fraction), "eval_salt": str(dcfg.eval_salt),
         "max_examples": int(dcfg.max_examples)}
    if dcfg.kind == "traces":
        d.update(selection=str(dcfg.selection), criterion=str(dcfg.criterion))
    else:
        d.update(squad_split=str(dcfg.squad_split), squad_num_buckets=int(dcfg.squad_num_buckets),
                 squad_pool_buckets=int(dcfg.squad_pool_buckets))
    return d


def identity(config, fingerprint: Optional[str] = None) -> Dict[str, Any]:
    """The run's identity (see the module docstring); ``fingerprint``: the model's, when known."""
    lcfg = config.lora
    return {
        "model_fingerprint": fingerprint or model_fingerprint(
            resolve_model_source(str(config.model.name))),
        "data": data_identity(config.data), "seed": int(config.seed),
        "state": {"lora": bool(lcfg.enabled),
                  "lora_rank": int(lcfg.rank) if lcfg.enabled else 0,
                  "lora_targets": _jsonable(list(lcfg.targets)) if lcfg.enabled else [],
                  "param_dtype": str(config.model.param_dtype)},
    }


def differences(old: Optional[dict], new: dict) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (old, new)}`` of the flattened dicts (a key one side lacks is ``None``)."""
    o, n = configs_util.flatten(old or {}), configs_util.flatten(new)
    return {k: (o.get(k), n.get(k)) for k in list(n) + [k for k in o if k not in n]
            if o.get(k) != n.get(k)}


def describe(diffs: Dict[str, Tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())


def _read_json(path: str) -> Optional[dict]:
    """The JSON object in ``path``; None when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check(config, workdir: str, ident: dict) -> list:
    """Refuse to resume ``workdir``'s checkpoints with another identity (unless
    ``train.resume_override``); returns the ``resume_overrides`` history to record."""
    old = _read_json(os.path.join(workdir, RUN_FILE))
    steps = steps_on_disk(workdir)
    if not steps:
        return []
    if old is None:
        log.warning("%s: no readable %s, so the model and data of checkpoints %s cannot be "
                    "checked", workdir, RUN_FILE, steps)
        return []
    diffs = differences(old.get("identity"), ident)
    overrides = list(old.get("resume_overrides", []))
    if diffs and not bool(config.train.resume_override):
        lines = "".join(f"\n  {k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
        raise RunIdentityError(
            f"{workdir} holds checkpoints {steps} of another run (recorded -> now):{lines}\n"
            "use a new workdir, or pass --config.train.resume_override=True to continue them "
            "anyway (the override is recorded in run.json)")
    if diffs:
        log.warning("train.resume_override: resuming %s despite %s", workdir, describe(diffs))
        overrides.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "differences": {k: list(v) for k, v in diffs.items()}})
    return overrides


def check_and_record(config, workdir: str, ident: dict) -> dict:
    """:func:`check`, then record ``ident`` and the settings in ``run.json``; returns the
    record."""
    overrides = check(config, workdir, ident)
    record = {"identity": ident, "settings": settings(config), "model": str(config.model.name),
              "data_source": str(config.data.source), "resume_overrides": overrides}
    if jax.process_count() > 1:  # every process has read the old record before it is replaced
        multihost_utils.sync_global_devices("run_identity_checked")
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, RUN_FILE), record)
    return record


def finished(config, workdir: str, ident: dict) -> Optional[dict]:
    """The stored ``result.json`` of ``workdir`` when it records a finished run of this
    identity and these settings whose final checkpoint is still as written; else None."""
    if not config.checkpoint.resume:
        return None
    res = _read_json(os.path.join(workdir, RESULT_FILE))
    if not res or res.get("preempted") or res.get("step") != res.get("total_steps"):
        return None
    if res.get("identity") != _jsonable(ident) or res.get("settings") != settings(config):
        return None
    final = res.get("final_checkpoint") or {}
    if final.get("files") != step_signature(workdir, res["step"]):
        return None
    export = res.get("export_dir")
    if config.export.enabled and not (export and os.path.isdir(export)):
        return None  # the normal path restores the state and exports it
    return dict(res, already_finished=True)
