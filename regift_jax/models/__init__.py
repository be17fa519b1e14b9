"""Models: one decoder for four families, checkpoint I/O and a one-call loader.

    >>> from regift_jax import models
    >>> m = models.load("smollm2-135m-instruct")        # preset name, HF dir or .gguf file
    >>> logits = m.logits(input_ids, attention_mask)     # float32 [B, T, V]
    >>> m.generate(["What is the capital of France?"], max_new_tokens=20, chat=True)
    >>> m.export("/tmp/smollm2_hf")                      # transformers can load this directory

``load`` never downloads: a preset other than the offline default needs its weights in a local
directory (``REGIFT_MODELS_DIR/<preset>`` or an explicit path); pass ``download=True`` (needs
internet and ``huggingface_hub``) to fetch the preset's Hugging Face repository first.

A model is three configs: :class:`ModelConfig` (``config.py``) is the architecture, what a
checkpoint's config.json fixes; :class:`RunConfig` (``run_config.py``) is how it is computed
(parameter and compute dtypes, remat policy, attention kernel, attention and loss chunking);
:class:`LoraConfig` (``run_config.py``, used by ``lora.py``) names the LoRA adapters (rank 0 =
none).  ``Decoder(cfg, run, lora)`` and every jitted function that runs the model take them as
separate static arguments; a :class:`ModelHandle` carries all three.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from regift_jax.core import sharding as shd
from regift_jax.core.prompts import wrap_chat
from regift_jax.models import presets
from regift_jax.models.checkpoints import (CheckpointError, export_hf, gguf_hf_config, load_gguf,
                                           load_hf, open_gguf, read_hf_config)
from regift_jax.models.config import ModelConfig, UnsupportedArchitectureError
from regift_jax.models.decoder import (Decoder, init_params, param_shardings,
                                       positions_from_mask, trace_context)
from regift_jax.models.lora import add_lora, merge_lora
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig, split_overrides
from regift_jax.models.sampling import Sampler, SamplingConfig
from regift_jax.models.tokenizer import load_tokenizer, smollm2_gguf_path

__all__ = ["load", "ModelHandle", "ModelConfig", "RunConfig", "LoraConfig", "Decoder",
           "CheckpointError", "UnsupportedArchitectureError", "init_params"]

DEFAULT_MODEL = "smollm2-135m-instruct"


@functools.partial(jax.jit, static_argnames=("cfg", "run", "lora"))
def _logits(params, input_ids, attention_mask, cfg, run=RunConfig(), lora=NO_LORA):
    return Decoder(cfg, run, lora).apply({"params": params}, input_ids,
                                         positions=positions_from_mask(attention_mask),
                                         segment_ids=attention_mask.astype(jnp.int32))


@dataclasses.dataclass
class ModelHandle:
    """A loaded model: architecture, run settings, LoRA, params, tokenizer, and convenience
    methods."""
    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Any = None
    source: str = ""
    run: RunConfig = RunConfig()
    lora: LoraConfig = NO_LORA

    @property
    def model(self) -> Decoder:
        return Decoder(self.cfg, self.run, self.lora)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """float32 logits [B, T, V]; ``attention_mask`` 1 = token, 0 = (left) padding."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim == 1:
            ids = ids[None]
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask,
                                                                              jnp.int32)
        with trace_context(self.mesh, self.run, pin_activations=False):  # as the scorer
            return np.asarray(_logits(self.params, ids, mask, self.cfg, self.run, self.lora),
                              np.float32)

    def sampler(self, **kw):
        return Sampler(self.cfg, self.params, self.tokenizer, mesh=self.mesh, run=self.run,
                       lora=self.lora, **kw)

    def chat_prompt(self, user: str, system: Optional[str] = None) -> str:
        """``user`` in the tokenizer's chat template (unchanged without one)."""
        return wrap_chat(self.tokenizer, user, system=system)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop_strings=(), seed: int = 0,
                 chat: bool = False, batch_size: int = 8):
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [self.chat_prompt(p) if chat else p for p in prompts]
        sc = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop_strings=tuple(stop_strings), seed=seed)
        return [g.text for g in self.sampler(batch_size=batch_size).generate(texts, sc)]

    def export(self, path: str, dtype: str = "float32"):
        """HF directory (config.json + safetensors + tokenizer); LoRA is merged first."""
        params = self.params
        if self.lora.enabled:
            params = merge_lora(self.lora, params)
        return export_hf(path, self.cfg, params, tokenizer=self.tokenizer, dtype=dtype)


def _resolve(name_or_path: str, download: bool):
    """-> (kind, path, preset or None)."""
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".gguf"):
            return "gguf", name_or_path, None
        raise CheckpointError(f"{name_or_path}: unknown checkpoint file type (expected .gguf or "
                              "a Hugging Face directory)")
    if os.path.isdir(name_or_path):
        return "hf", name_or_path, None
    try:
        preset = presets.get_preset(name_or_path)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{name_or_path!r} is neither a file, a directory nor a preset: "
                              f"{e}") from None
    key = preset.name
    if key == DEFAULT_MODEL:
        return "gguf", smollm2_gguf_path(), preset
    local = os.path.join(os.environ.get("REGIFT_MODELS_DIR",
                                        os.path.expanduser("~/.cache/regift_jax/models")), key)
    if os.path.isdir(local):
        return "hf", local, preset
    if download:
        # lazy: huggingface_hub is optional; only this opt-in download needs it
        from huggingface_hub import snapshot_download
        snapshot_download(preset.hf_repo, local_dir=local,
                          allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        return "hf", local, preset
    raise CheckpointError(
        f"weights for preset {key!r} ({preset.hf_repo}) are not available locally: expected a "
        f"Hugging Face directory at {local} (set REGIFT_MODELS_DIR), or pass download=True with "
        f"internet access")


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: Optional[str] = None,
         param_dtype: Optional[str] = None, mesh=None, rules=None, tokenizer: bool = True,
         download: bool = False, **cfg_overrides) -> ModelHandle:
    """Load a model by preset name, HF safetensors directory or .gguf file.

    ``dtype``/``param_dtype``: compute / parameter dtype (default float32).  ``mesh``: place the
    params on their logical-axis shardings (:mod:`regift_jax.core.sharding`) while streaming
    them in.  Extra keyword arguments set :class:`RunConfig` fields (``remat_policy=...``),
    LoRA (``lora_rank=16``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``: fresh adapters)
    or override :class:`ModelConfig` fields.
    """
    kind, path, _ = _resolve(name_or_path, download)
    arch, run_kw, lora_kw = split_overrides(cfg_overrides)
    if dtype:
        run_kw["dtype"] = dtype
    if param_dtype:
        run_kw["param_dtype"] = param_dtype
    run = RunConfig(**run_kw)
    loader = load_gguf if kind == "gguf" else load_hf
    shardings = None
    if mesh is not None:
        # Shapes only depend on the architecture, so read the config first, cheaply.
        hf = gguf_hf_config(open_gguf(path), path) if kind == "gguf" else read_hf_config(path)
        base = ModelConfig.from_hf_config(hf, **arch)
        shardings = param_shardings(base, mesh, rules or shd.DEFAULT_RULES, run)
    cfg, params = loader(path, shardings=shardings, param_dtype=run.param_dtype, **arch)
    lora = NO_LORA
    if lora_kw:
        lora = LoraConfig(**lora_kw)
        params = add_lora(cfg, lora, params, mesh=mesh, rules=rules)
    tok = None
    if tokenizer:
        tok = load_tokenizer(path)
    return ModelHandle(cfg=cfg, params=params, tokenizer=tok, mesh=mesh, source=path, run=run,
                       lora=lora)
