"""The JAX student as an lm-evaluation-harness model: lm-eval's ``regift_jax`` backend.

    python -m regift_jax.lm_eval --model_args model=smollm2-135m-instruct --tasks bbq --limit 20

    from regift_jax.eval import harness
    out = harness.evaluate("smollm2-135m-instruct", ["bbq"], limit=20)
    out["results"]["bbq"]["acc,none"]

``model`` is anything :func:`regift_jax.models.load` takes (a preset name, a Hugging Face
directory, a ``.gguf`` file) or a training work directory (its exported, LoRA-merged Hugging Face
directory: ``result.json``'s ``export_dir``, else ``<workdir>/export``).  Importing this module
registers the model under the name ``regift_jax``, so lm-eval's own CLI and
``lm_eval.simple_evaluate(model="regift_jax", ...)`` find it too; the offline task definitions
(``bbq`` and its variants over the vendored BBQ files) are in :data:`TASKS_DIR`
(``TaskManager(include_path=TASKS_DIR)``, as :func:`evaluate` and the CLI do).

Requests are turned into tokens exactly as lm-eval's Hugging Face backend
(``lm_eval.models.huggingface.HFLM``) does: ``TemplateLM``'s context/continuation split, the same
``tok_encode`` (the tokenizer's own special-token default, ``add_bos_token`` override, no second
BOS), the same left truncation to ``max_length`` (default: the model config's
``max_position_embeddings``), the same rolling windows (``get_rolling_token_windows`` with
``context_len=1``) and the same stop handling for generation (the EOS text added to ``until``,
output decoded without special tokens and cut at the first stop string).  Only the model
computation differs: log-likelihoods come from the project's batched, jitted scorer
(:func:`regift_jax.eval.loglik.score_requests`; continuations of one context share its forward
pass), generations from the shared KV-cache sampler (:mod:`regift_jax.models.sampling`).
:class:`_Engine` is the one place that calls them.

Model arguments (``--model_args k=v,...``): ``model`` (or ``pretrained``), ``dtype`` (compute
dtype, default the model's, float32), ``batch_size`` (scorer rows / sampler rows; ``auto`` = 8),
``max_length``, ``max_gen_toks`` (default 256, as HFLM), ``add_bos_token``, ``prefix_token_id``,
``method`` (``prefix`` | ``packed`` | ``unpacked``, see :mod:`regift_jax.eval.loglik`), ``seed``
(sampling with ``do_sample``), ``fsdp`` / ``tensor`` (mesh axes; the data axis takes the
remaining devices).  With more than one device the parameters are sharded over a
``("data", "fsdp", "tensor")`` mesh (:mod:`regift_jax.core.sharding`) and every batch over its
data axes.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax

try:  # the optional lm_eval extra: pip install -e ".[lm_eval]"
    import lm_eval
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix,
                                      normalize_gen_kwargs, postprocess_generated_text)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"regift_jax.eval.harness needs lm-evaluation-harness ({e}); install it "
                      f"with: pip install -e '.[lm_eval]'  (lm-eval==0.4.13)") from None

from regift_jax import models
from regift_jax.core import sharding
from regift_jax.core.shapes import round_up
from regift_jax.eval import loglik
from regift_jax.models.sampling import SamplingConfig

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
MODEL_NAME = "regift_jax"
DEFAULT_BATCH = 8
# Generation keywords the sampler understands (lm-eval's normalised names).
_GEN_KEYS = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks"}


def resolve_model(model: str) -> str:
    """A training work directory -> its exported Hugging Face directory; anything else as is."""
    if not os.path.isdir(model):
        return model
    result = os.path.join(model, "result.json")
    export = os.path.join(model, "export")
    if not os.path.isfile(result) and not os.path.isdir(export):
        return model  # a Hugging Face directory
    candidates = [export]
    if os.path.isfile(result):
        try:
            with open(result, encoding="utf-8") as f:
                candidates.insert(0, json.load(f).get("export_dir") or export)
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{result}: unreadable training result ({e})") from None
    for d in candidates:
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise ValueError(f"{model}: a training work directory without an exported model (looked "
                     f"in {', '.join(dict.fromkeys(candidates))}); train with "
                     f"export.enabled=True or pass an exported Hugging Face directory")


def _mesh(fsdp: int, tensor: int):
    """A mesh over every device when there is more than one (or a model axis is asked for)."""
    if jax.device_count() == 1 and fsdp == 1 and tensor == 1:
        return None
    return sharding.make_mesh({"data": -1, "fsdp": fsdp, "tensor": tensor})


def _batch_rows(batch_size, mesh) -> int:
    """lm-eval's ``batch_size`` (int, numeric string or ``auto[:N]``) as a row count that the
    mesh's batch axes divide."""
    rows = DEFAULT_BATCH if str(batch_size).startswith("auto") else int(batch_size)
    if rows < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return round_up(rows, sharding.batch_shards(mesh))


class _Engine:
    """The one adapter to the project's scorer and sampler (token ids in, numbers out)."""

    def __init__(self, handle, batch_rows: int, method: str):
        self.handle, self.batch_rows, self.method = handle, batch_rows, method
        # The prefix method's group stage places G group rows on the mesh; G follows the
        # grouping, not batch_rows, so it need not divide the data axes: groups off there.
        mesh = handle.mesh
        self.max_group = 1 if mesh is not None and mesh.size > 1 else 2
        self._sampler = None

    def score(self, contexts: Sequence[Tuple[int, ...]],
              continuations: Sequence[Tuple[Tuple[int, ...], ...]], progress) -> Any:
        """``[N, K]`` log-likelihood sums and greedy flags of each context's K continuations."""
        reqs = [loglik.Request(c, conts, f"lm-eval request {i}")
                for i, (c, conts) in enumerate(zip(contexts, continuations))]
        longest = max(len(c) + max(map(len, conts)) for c, conts in zip(contexts, continuations))
        return loglik.score_requests(self.handle, reqs, method=self.method,
                                     batch_rows=self.batch_rows, max_group=self.max_group,
                                     seq_len=round_up(longest + 64, 64), progress=progress)

    def generate(self, prompts: Sequence[List[int]], sampling: SamplingConfig, progress):
        """Generated token ids (EOS excluded, cut after the first stop string) per prompt."""
        if self._sampler is None:
            self._sampler = self.handle.sampler(batch_size=self.batch_rows)
        gens = self._sampler.generate(list(prompts), sampling, progress=progress)
        return [g.token_ids for g in gens]


def _group_by_context(pairs: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]]):
    """``{K: [(context, [(pair index, continuation)] * K)]}``: continuations of one context
    together (one forward pass of the context), contexts bucketed by their count K (the scorer
    takes one K per call)."""
    by_ctx: Dict[Tuple[int, ...], List[Tuple[int, Tuple[int, ...]]]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(pairs):
        by_ctx[ctx].append((i, cont))
    by_k: Dict[int, list] = defaultdict(list)
    for ctx, members in by_ctx.items():
        by_k[len(members)].append((ctx, members))
    return by_k


@register_model(MODEL_NAME)
class RegiftLM(TemplateLM):
    """lm-eval's ``LM`` over a regift_jax model (see the module docstring)."""

    def __init__(self, model: str = models.DEFAULT_MODEL, dtype: Optional[str] = None,
                 batch_size=DEFAULT_BATCH, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, add_bos_token: Optional[bool] = None,
                 prefix_token_id: Optional[int] = None, method: str = "prefix",
                 seed: int = 1234, fsdp: int = 1, tensor: int = 1,
                 device: Optional[str] = None, max_batch_size: Optional[int] = None,
                 pretrained: Optional[str] = None, handle=None):
        """``device`` and ``max_batch_size`` come from lm-eval's CLI for every backend; JAX
        places the work on its own devices.  ``pretrained``: ``model`` under the HF backend's
        name.  ``handle``: an already loaded :class:`regift_jax.models.ModelHandle` (``model``
        is then only its name)."""
        super().__init__()
        del device, max_batch_size
        model = pretrained or model
        if method not in loglik.METHODS:
            raise ValueError(f"method must be one of {loglik.METHODS}, got {method!r}")
        if handle is None:
            mesh = _mesh(int(fsdp), int(tensor))
            handle = models.load(resolve_model(str(model)), dtype=dtype, mesh=mesh)
        if handle.tokenizer is None:
            raise ValueError(f"{model}: the model has no tokenizer; lm-eval needs one")
        self.handle = handle
        self.tokenizer = handle.tokenizer
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.engine = _Engine(handle, _batch_rows(batch_size, handle.mesh), method)
        self.model_name = str(model)

    # ---------------------------------------------------------------- tokenizer (as HFLM)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or int(self.handle.cfg.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> List[int]:
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: List[Dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ---------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> List[Tuple[float, bool]]:
        """``requests``: ``(cache key, context ids, continuation ids)`` as ``TemplateLM``
        builds them; left truncation to ``max_length + 1`` tokens as HFLM."""
        pairs = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("lm-eval request with an empty context or continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length="
                                 f"{self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            pairs.append((tuple(whole[:-len(cont)]), tuple(cont)))
        out: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        progress = None if disable_tqdm else "regift_jax loglikelihood"
        for k, groups in sorted(_group_by_context(pairs).items()):
            sc = self.engine.score([c for c, _ in groups],
                                   [tuple(cont for _, cont in m) for _, m in groups], progress)
            for g, (_, members) in enumerate(groups):
                for j, (i, _) in enumerate(members):
                    out[i] = (float(sc.logprob_sum[g, j]), bool(sc.is_greedy[g, j]))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole-text log-likelihoods over disjoint windows of ``max_length`` tokens, the first
        conditioned on ``prefix_token_id`` (HFLM's windows, scored in one batched call)."""
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            ws = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, ctx, cont) for ctx, cont in ws)
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm) if windows else []
        out, start = [], 0
        for (string,), n in zip([r.args for r in requests], counts):
            total = sum(s for s, _ in scores[start:start + n])
            start += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Generations per request, batched by equal generation settings (as HFLM)."""
        args = [r.args for r in requests]
        groups: Dict[str, List[int]] = defaultdict(list)
        for i, (_, gen_kwargs) in enumerate(args):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
        out: List[Optional[str]] = [None] * len(args)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            sampling, until = self._sampling(args[idx[0]][1], eos)
            max_ctx = self.max_length - sampling.max_new_tokens
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={sampling.max_new_tokens} leaves no room for "
                                 f"the prompt within max_length={self.max_length}")
            prompts = [self._prompt_ids(args[i][0])[-max_ctx:] for i in idx]
            ids = self.engine.generate(prompts, sampling,
                                       None if disable_tqdm else "regift_jax generate_until")
            for i, toks in zip(idx, ids):
                text = postprocess_generated_text(self.tok_decode(toks), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]

    def _prompt_ids(self, context: str) -> List[int]:
        """HFLM's ``tok_batch_encode`` for one prompt (no second BOS, else the override)."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            return self.tokenizer.encode(context, add_special_tokens=False)
        return self.tok_encode(context)

    def _sampling(self, gen_kwargs: dict, eos: str) -> Tuple[SamplingConfig, List[str]]:
        kw = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        unknown = sorted(set(kw) - _GEN_KEYS)
        if unknown:
            raise ValueError(f"generation arguments {unknown} are not supported by the "
                             f"{MODEL_NAME} backend (supported: {', '.join(sorted(_GEN_KEYS))})")
        until = handle_stop_sequences(kw.get("until"), eos=eos)
        greedy = not kw.get("do_sample")
        return SamplingConfig(max_new_tokens=int(kw["max_gen_toks"]),
                              temperature=0.0 if greedy else float(kw.get("temperature", 1.0)),
                              top_p=float(kw.get("top_p", 1.0)), top_k=int(kw.get("top_k", 0)),
                              stop_strings=tuple(until), seed=self.seed), until


def task_manager(include_path=None, **kwargs) -> "TaskManager":
    """lm-eval's task manager with the offline tasks of :data:`TASKS_DIR` (they replace the
    hub-backed ``bbq`` tasks of the same names) and any further ``include_path``."""
    extra = [] if include_path is None else (
        list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
    return TaskManager(include_path=[TASKS_DIR] + extra, **kwargs)


def evaluate(model=models.DEFAULT_MODEL, tasks: Sequence[str] = ("bbq",), *,
             model_args: Optional[dict] = None, include_path=None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with the ``regift_jax`` backend and the offline tasks.

    ``model``: a model name/path (loaded with ``model_args``, see the module docstring) or a
    :class:`RegiftLM`; ``kwargs`` go to ``simple_evaluate`` (``limit``, ``samples``,
    ``num_fewshot``, ``log_samples``, ``gen_kwargs``, ...)."""
    lm = model if isinstance(model, RegiftLM) else RegiftLM(model=model, **(model_args or {}))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks),
                                   task_manager=task_manager(include_path), **kwargs)


__all__ = ["RegiftLM", "MODEL_NAME", "TASKS_DIR", "evaluate", "resolve_model", "task_manager"]
