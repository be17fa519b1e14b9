"""The TPU preflight (regift_jax.preflight): programs compiled for TPU topologies on this CPU.

A reduced Llama (two layers, width 768) is compiled for two small slices, v5e:2x2 and v4:2x2x1:
the train step (full fine-tuning and the paper's LoRA recipe) and the teacher's decode step.
Memory per chip is checked against parameters x bytes (and Adam's two moments), the KV cache
against its shape, FLOPs against the analytic count: 6 x N x tokens (+ attention) for a full
step without remat or chunking, and the executed count (remat, LoRA, causal chunks) otherwise,
within 5% (XLA also counts element-wise work; 15% for the 8-token decode step of this small
model, whose element-wise work is relatively large).  A config that cannot fit is refused by the
command line with the message.  Skipped without libtpu (``pip install -e '.[tpu]'``).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from _data import REPO
from regift_jax.preflight import compiled as comp
from regift_jax.preflight import hardware

pytestmark = pytest.mark.skipif(not hardware.libtpu_available(),
                                reason="needs libtpu: pip install -e '.[tpu]'")

GIB = 1024 ** 3
TOL = 0.05  # analytic vs compiled FLOPs and bytes
# A decode step of this small model (8 tokens): the greedy argmax over the vocabulary, masks and
# cache updates add 5-15% to its matmul FLOPs (under 1% at paper scale, where matmuls dominate).
DECODE_TOL = 0.15
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048,
        "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 2,
        "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
# Too large for one 16 GiB v5e chip: two 262144 x 8192 float32 matrices (17 GB).
HUGE = dict(TINY, vocab_size=262144, hidden_size=8192, intermediate_size=512,
            num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8, head_dim=128)


def _model_dir(root, name, hf):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    return str(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("preflight"), "tiny", TINY)


def _train_config(model, **over):
    from regift_jax.core.configs_util import load_config_file
    c = load_config_file("configs/llama.py:llama3_1_8b" + ("_full" if over.pop("full") else ""))
    c.model.name = model
    c.train.global_batch, c.data.seq_len = 8, 128
    c.train.micro_batch = -1  # the whole batch at once (as the presets)
    for key, v in over.items():
        sec, k = key.split("__")
        c[sec][k] = v
    return c


def _run(config, topology, **kw):
    from regift_jax import preflight
    return preflight.run(config, topology, **kw)


@pytest.fixture(scope="module")
def full_step(tiny):
    """Full fine-tuning, no remat, plain attention and loss: executed FLOPs = 6 N T (+ attn)."""
    c = _train_config(tiny, full=True, model__remat_policy="none", model__attention_chunk=0,
                      model__loss_chunk=0)
    return _run(c, "v5e:2x2")[0], c


@pytest.fixture(scope="module")
def lora_step(tiny):
    # the saved-dots policy, whose executed FLOPs the analytic count follows on a tiny model too
    # (the presets' "full" is checked on the 8B cells of benchmarks/tpu_preflight.py)
    return _run(_train_config(tiny, full=False, model__remat_policy="dots_with_no_batch_dims"),
                "v4:2x2x1")[0]


def test_slices_and_chips():
    s = hardware.parse_slice("v5litepod-16")
    assert (s.topology, s.num_chips, s.chip.hbm_gib) == ("v5e:4x4", 16, 16.0)
    assert hardware.parse_slice("v4-32").topology == "v4:2x2x4"  # v4 counts TensorCores
    assert hardware.parse_slice("v5p-8").num_chips == 4
    assert hardware.parse_slice("v6e:2x4").accelerator_type == "v6e-8"
    assert [hardware.CHIPS[g].peak_flops / 1e12 for g in ("v4", "v5e", "v5p", "v6e")] == [
        275, 197, 459, 918]
    with pytest.raises(hardware.TopologyError, match="accelerator type"):
        hardware.parse_slice("tpu7-8")
    assert len(hardware.topology_devices("v4:2x2x1")) == 4  # megacore: one device per chip


def test_collectives_and_buffers_are_read_from_hlo_text():
    hlo = """ENTRY %main (p: f32[8,1024]) -> f32[64,1024] {
  %p = f32[8,1024]{1,0} parameter(0)
  %ag = f32[64,1024]{1,0} all-gather(%p), replica_groups=[1,8]<=[8], dimensions={0}
  %ar-start = (f32[256]{0}, f32[256]{0}) all-reduce-start(%x), replica_groups={{0,1},{2,3}}
  %ar-done = f32[256]{0} all-reduce-done(%ar-start)
  ROOT %d = f32[64,1024]{1,0} add(%ag, %ag), metadata={op_name="jit(f)/add"}
}"""
    c = comp.collectives(hlo, 8)
    assert (c["all-gather"].count, c["all-gather"].bytes) == (1, 64 * 1024 * 4)
    assert c["all-gather"].moved_bytes == 64 * 1024 * 4 * 7 / 8
    assert (c["all-reduce"].count, c["all-reduce"].moved_bytes) == (1, 2 * 1024 * 1 / 2)
    assert comp.largest_buffers(hlo, 2) == ["0.00 GiB f32[64,1024] (all-gather)",
                                            "0.00 GiB f32[64,1024] (jit(f)/add)"]


def test_full_step_memory_and_flops_match_the_analytic_count(full_step):
    rep, _ = full_step
    from regift_jax.models.config import ModelConfig
    n = ModelConfig.from_hf_config(TINY).num_params()
    assert rep.fits and rep.chips == 4 and rep.mesh["fsdp"] == 4
    # ZeRO-3 over 4 chips: float32 parameters and Adam's two float32 moments.
    assert rep.params_gib * GIB == pytest.approx(n * 4 / 4, rel=0.01)
    assert rep.opt_state_gib * GIB == pytest.approx(2 * n * 4 / 4, rel=0.01)
    assert rep.arguments_gib >= rep.params_gib + rep.opt_state_gib
    assert rep.hbm_gib_per_chip <= rep.hbm_capacity_gib and rep.headroom_gib > 0
    # 6 N per token plus attention (12 L H hd T): the trainer's MFU numerator.
    L, H, hd, T, tokens = 2, 12, 64, 128, 8 * 128
    model_flops = tokens * (6 * (n - 2048 * 768) + 12 * L * H * hd * T)
    assert rep.flop_check["ok"], rep.flop_check
    assert rep.flop_check["xla_flops"] == pytest.approx(model_flops, rel=TOL)
    assert rep.step_seconds > 0 and 0 < rep.mfu <= 1
    assert not [n for n in rep.notes if "XLA gave no" in n]  # XLA timed every piece
    assert rep.tokens_per_s_per_chip * rep.step_seconds * rep.chips == pytest.approx(tokens)
    assert rep.collectives  # FSDP gathers weights and reduce-scatters gradients


def test_lora_recipe_step_on_v4(lora_step):
    rep = lora_step
    assert rep.topology == "v4:2x2x1" and rep.fits and rep.remat_policy == "dots_with_no_batch_dims"
    assert rep.opt_state_gib < rep.params_gib / 20  # only the adapters train
    assert rep.flop_check["ok"], rep.flop_check  # executed: remat, LoRA, causal chunks
    assert rep.step_seconds > 0 and 0 < rep.mfu <= 1


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_decode_step_memory_and_flops(tiny, topology):
    from regift_jax.core.configs_util import load_config_file
    c = load_config_file("configs/teacher_qwen2.py")
    c.teacher.model, c.batch_size, c.decode.max_new_tokens, c.length_bucket = tiny, 8, 64, 64
    rep = _run(c, topology, mesh="fsdp=-1", prompt_len=64, only=["decode"])[0]
    from regift_jax.models.config import ModelConfig
    n = ModelConfig.from_hf_config(TINY).num_params()
    assert rep.stage == "decode" and rep.fits and rep.chips == 4
    # bfloat16 weights (the teacher's compute dtype, as the trace generator loads them), FSDP
    assert rep.params_gib * GIB == pytest.approx(n * 2 / 4, rel=0.01)
    cache = 2 * 2 * 8 * 4 * 64 * 128 * 2  # k and v: layers x batch x kv heads x hd x slots, bf16
    assert rep.cache_gib * GIB >= cache / 4 * (1 - TOL)
    assert abs(rep.flop_check["ratio"] - 1) <= DECODE_TOL, rep.flop_check
    assert rep.tokens_per_s_per_chip > 0


def test_a_config_that_cannot_fit_is_refused(tmp_path):
    huge = _model_dir(tmp_path, "huge", HUGE)
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "regift_jax.preflight", "--config=configs/eval.py",
                        f"--model={huge}", "--topology=v5e:2x2", f"--out={out}",
                        "--noexplain_oom"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "DOES NOT FIT" in r.stdout and "chips have 16 GiB" in r.stdout
    assert re.search(r"parameters 16\.\d\d GiB", r.stdout)
    assert "try: shard the weights" in r.stdout
    rep = json.loads(out.read_text())["reports"][0]
    assert rep["stage"] == "score" and rep["fits"] is False and rep["hbm_gib_per_chip"] > 16
    assert rep["step_seconds"] is None


def test_splash_attention_is_in_the_compiled_train_step(tiny):
    """``model.attention_impl="splash"``: the preflight traces the step as the trainer does
    (under its mesh), so the Pallas TPU kernel is in the TPU program, and the estimate says the
    cost model cannot see it and adds its attention analytically."""
    from regift_jax.preflight.estimate import KERNEL_NOTE
    # remat dots: with "full" the tiny model's elementwise recomputation is 6% of its FLOPs
    rep = _run(_train_config(tiny, full=False, model__attention_impl="splash",
                             model__remat_policy="dots_with_no_batch_dims"), "v5e:2x2")[0]
    assert rep.fits
    assert [n for n in rep.notes if KERNEL_NOTE in n], rep.notes
    # the kernel's attention FLOPs are added analytically: XLA's count plus them matches the
    # analytic count of the step, which includes the attention
    assert rep.flop_check["ok"], rep.flop_check


def test_train_micro_batch_is_the_trainers(tiny):
    """The step is compiled with the trainer's micro-batches (``train.micro_batch`` first, as
    ``training.inputs.accum_steps`` counts them)."""
    from regift_jax.preflight import hardware, programs
    c = _train_config(tiny, full=False)
    c.train.global_batch, c.train.micro_batch = 8, 4
    stage = programs.train_stage(c, hardware.topology_devices("v5e:2x2"))
    assert (stage.rows, stage.accum) == (8, 2)
    c.train.grad_accum_steps = 4  # contradicts micro_batch: the trainer's own error
    with pytest.raises(programs.PreflightError, match="micro_batch=4 gives 2 micro-batches"):
        programs.train_stage(c, hardware.topology_devices("v5e:2x2"))
