"""Sharded inference: the sampler (teacher, evaluator's generate mode) and the log-likelihood
scorer on a data=2 x fsdp=2 x tensor=2 mesh of 8 simulated CPU devices give what they give on
one device, with the KV cache laid out by ``sampling.cache_shardings``; ``teacher.mesh`` parsing;
two processes generating traces with one teacher sharded over both (lockstep) write the traces of
one unsharded process; the 32B preset's decode step fits a v5e-16 (compile-only, libtpu).
"""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

import _smollm2

from regift_jax.core import sharding
from regift_jax.traces import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, ml_collections
    import numpy as np
    from regift_jax import models
    from regift_jax.eval.loglik import Request, score_requests
    from regift_jax.models import sampling
    from regift_jax.models.checkpoints import export_hf
    from regift_jax.models.config import ModelConfig
    from regift_jax.models.decoder import init_params
    from regift_jax.traces.generate import teacher_mesh
    assert jax.device_count() == 8, jax.devices()

    def specs(cache):  # per dimension: None, an axis name or a list of them
        return {{k: list(v.sharding.spec) + [None] * (v.ndim - len(v.sharding.spec))
                for k, v in cache.items()}}

    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=0,
                      pad_token_id=0, rope_theta=10000.0)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          jax.eval_shape(lambda: init_params(cfg)))
    export_hf(sys.argv[1], cfg, params)
    plain = models.load(sys.argv[1], dtype="float32", tokenizer=False)
    tcfg = ml_collections.ConfigDict({{"teacher": {{"mesh": "data=2,fsdp=2,tensor=2"}}}})
    sharded = models.load(sys.argv[1], dtype="float32", tokenizer=False,
                          mesh=teacher_mesh(tcfg))  # the trace generator's own load
    out = {{"param_specs": {{}}}}
    for path, x in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        out["param_specs"][jax.tree_util.keystr(path)] = str(x.sharding.spec)

    prompts = [list(rng.randint(3, 500, n)) for n in (5, 11, 3, 17, 8, 2)]
    prefix = list(rng.randint(3, 500, 9))
    sc = sampling.SamplingConfig(max_new_tokens=12)
    for name, h in (("plain", plain), ("sharded", sharded)):
        s = h.sampler(batch_size=4, length_bucket=8, chunk=5)
        out[name] = [g.token_ids for g in s.generate(prompts, sc)]
        out[name + "_prefix"] = [g.token_ids for g in s.generate(prompts, sc, prefix=prefix)]
        reqs = [Request(tuple(prefix + p), ((7, 8, 9), (int(p[0]),), (11, 12)), str(i))
                for i, p in enumerate(prompts)]
        for method in ("prefix", "packed"):
            sc_ = score_requests(h, reqs, method=method, batch_rows=4, seq_len=64)
            out[name + "_loglik_" + method] = sc_.logprob_sum.tolist()
            # 3 rows do not divide the 4 batch shards: rounded up to 4, not an IndivisibleError
            sc_ = score_requests(h, reqs, method=method, batch_rows=3, seq_len=64)
            out[name + "_loglik3_" + method] = sc_.logprob_sum.tolist()
        s3 = h.sampler(batch_size=3, length_bucket=8, chunk=5)
        out[name + "_batch3"] = [g.token_ids for g in s3.generate(prompts, sc)]
        out[name + "_batch3_size"] = s3.batch_size
        if name == "sharded":  # the cache after prefill and after decoding
            st = s._prefill(prompts[:4], [], 24, 0, 48, [0, 1, 2, 3])
            out["cache_prefill"] = specs(st.cache)
            s._decode_rows(st, sc, 4)
            out["cache_decoded"] = specs(st.cache)
            st = s._prefill(prompts[:4], prefix, 24, 16, 56, [0, 1, 2, 3])
            out["cache_prefix"] = specs(st.cache)
            one = sampling.prefill(h.params, np.ones((1, 8), np.int32), np.ones((1, 8), np.int32),
                                   h.cfg, 16, mesh=h.mesh)[1]
            out["cache_one_row"] = specs(one)
    json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_inference")
    script = tmp / "run.py"
    script.write_text(SCRIPT.format(repo=REPO))
    out = tmp / "out.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE)
    p = subprocess.run([sys.executable, str(script), str(tmp / "tiny"), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())


def test_sharded_greedy_generation_equals_unsharded(sharded_run):
    r = sharded_run
    assert r["sharded"] == r["plain"] and r["sharded_prefix"] == r["plain_prefix"]
    # a batch size the mesh's 4 batch shards do not divide is rounded up, same tokens
    assert r["sharded_batch3"] == r["plain"] == r["plain_batch3"]
    assert (r["sharded_batch3_size"], r["plain_batch3_size"]) == (4, 3)
    assert all(len(t) > 0 for t in r["plain"])
    # The teacher's params really are sharded (q_proj: layers, embed->fsdp, heads->tensor).
    spec = [v for k, v in r["param_specs"].items() if "q_proj" in k][0]
    assert "fsdp" in spec and "tensor" in spec, r["param_specs"]


def test_kv_cache_carries_the_preflight_layout(sharded_run):
    """Batch over data x fsdp and KV heads over tensor, after prefill, after decode chunks and
    after the shared-prefix path; a one-row cache replicates its batch instead of failing."""
    dp = ["data", "fsdp"]
    want = {"k": [None, dp, "tensor", None, None], "v": [None, dp, "tensor", None, None],
            "pos": [dp, None], "seg": [dp, None], "index": []}
    for stage in ("cache_prefill", "cache_decoded", "cache_prefix"):
        assert sharded_run[stage] == want, (stage, sharded_run[stage])
    one = sharded_run["cache_one_row"]
    assert one["k"] == [None, None, "tensor", None, None] and one["pos"] == [None, None], one


def test_sharded_loglik_equals_unsharded(sharded_run):
    import numpy as np
    for method in ("prefix", "packed"):
        a = np.array(sharded_run["sharded_loglik_" + method])
        b = np.array(sharded_run["plain_loglik_" + method])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        a3 = np.array(sharded_run["sharded_loglik3_" + method])  # 3 rows -> 4 on the mesh
        np.testing.assert_allclose(a3, b, rtol=1e-5, atol=1e-5)
        assert np.isfinite(a).all() and (a < 0).all()


def test_teacher_mesh_parsing():
    """``teacher.mesh``: "" = no mesh; the evaluator's syntax over this process's devices; a bad
    entry is a config error naming the key."""
    c = lambda m: ml_collections.ConfigDict({"teacher": {"mesh": m}})  # noqa: E731
    assert generate.teacher_mesh(c("")) is None
    mesh = generate.teacher_mesh(c("tensor=-1"))
    assert mesh.shape["tensor"] == len(mesh.devices.flat) and mesh.axis_names == sharding.MESH_AXES
    with pytest.raises(generate.TraceConfigError, match="teacher.mesh: .*bad entry 'tp=2'"):
        generate.teacher_mesh(c("tp=2"))
    with pytest.raises(generate.TraceConfigError, match="teacher.mesh: .*devices"):
        generate.teacher_mesh(c("tensor=4096"))
    assert sharding.parse_mesh_shape("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}


def test_paper_teacher_preset_is_sharded():
    from regift_jax.core import configs_util
    c = configs_util.load_config_file(os.path.join(REPO, "configs",
                                                   "teacher_qwen2.py:r1_distill_qwen_32b"))
    assert sharding.parse_mesh_shape(c.teacher.mesh) == {"fsdp": -1, "tensor": 8}


# ============================================================================ multi-host teacher
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (weights large enough that greedy argmax
    margins dwarf float32 reduction-order differences)."""
    import jax
    import numpy as np
    from regift_jax.models.decoder import init_params

    def large(cfg):
        rng = np.random.RandomState(3)
        return jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                            jax.eval_shape(lambda: init_params(cfg)))
    return _smollm2.export_tiny_teacher(tmp_path_factory.mktemp("teacher"), large)


def _trace_cmd(teacher, out, *extra):
    return [sys.executable, "-m", "regift_jax.generate_traces",
            "--config=configs/teacher_smollm2.py:smoke", f"--config.teacher.model={teacher}",
            f"--config.out_dir={out}", "--config.data.max_questions=3",
            "--config.num_samples=2", "--config.batch_size=4", "--config.teacher.dtype=float32",
            "--config.decode.max_reasoning_tokens=6", "--config.decode.max_answer_tokens=4",
            "--config.progress=False", *extra]


def _traces(out):
    import gzip
    files = sorted(f for f in os.listdir(out) if f.startswith("traces-p"))
    recs = [json.loads(ln) for f in files for ln in gzip.open(os.path.join(out, f), "rt")]
    return files, sorted((r["id"], r["sample_index"], r["raw_generation"]) for r in recs)


def test_two_hosts_run_one_sharded_teacher_in_lockstep(teacher_dir, tmp_path):
    """2 processes x 4 CPU devices, ``teacher.mesh=data=2,fsdp=2,tensor=2`` over all 8: the
    traces equal one unsharded process's, and process 0 alone wrote them, as one stream."""
    base = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS=FAST_COMPILE)
    ref = str(tmp_path / "ref")
    r = subprocess.run(_trace_cmd(teacher_dir, ref), cwd=REPO, env=base, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out, port = str(tmp_path / "mh"), _free_port()
    cmd = _trace_cmd(teacher_dir, out, "--config.teacher.mesh=data=2,fsdp=2,tensor=2")
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(base, JAX_NUM_CPU_DEVICES="4",
                                                  JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "(lockstep)" in logs[1]
    files, got = _traces(out)
    assert files == ["traces-p00000.jsonl.gz"] and len(got) == 6
    assert got == _traces(ref)[1]
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["processes"] == 1


def test_paper_teacher_fits_a_v5e_16_by_its_own_mesh():
    """Compile-only (libtpu's v5e:4x4 topology on this CPU): the 32B preset's decode step, on the
    preset's ``teacher.mesh`` (fsdp=2 x tensor=8 over 16 chips), fits 16 GiB chips."""
    from regift_jax import preflight
    from regift_jax.core import configs_util
    from regift_jax.preflight import hardware
    if not hardware.libtpu_available():
        pytest.skip("needs libtpu: pip install -e '.[tpu]'")
    c = configs_util.load_config_file(os.path.join(REPO, "configs",
                                                   "teacher_qwen2.py:r1_distill_qwen_32b"))
    rep = preflight.run(c, "v5e-16", mesh=c.teacher.mesh, estimate=False, explain_oom=False,
                        only=["decode"])[0]
    assert rep.mesh == {"data": 1, "fsdp": 2, "tensor": 8} and rep.chips == 16
    assert rep.fits and rep.hbm_gib_per_chip < 16, rep
