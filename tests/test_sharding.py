"""Mesh + logical-axis rules; streaming a checkpoint straight into its sharding."""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from regift_jax.core import sharding as shd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shd.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8)["fsdp"] == 2
    with pytest.raises(ValueError, match="at most one axis"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="needs 12 devices"):
        shd.resolve_mesh_shape({"data": 3, "fsdp": 4}, 8)


class _FakeMesh:
    def __init__(self, shape):
        self.shape = shape


def test_logical_to_spec_rules_and_fallback():
    mesh = _FakeMesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 8), mesh) == \
        P("fsdp", "tensor", None)
    assert shd.logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"), None)
    fb = []
    # 3 kv heads cannot be split over tensor=2: replicated, and the fallback is recorded
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 8), mesh, fallbacks=fb) \
        == P("fsdp", None, None)
    assert fb and fb[0][2] == 3
    # a mesh axis is used at most once per array
    assert shd.logical_to_spec(("vocab", "mlp"), (64, 64), mesh) == P("tensor", None)
    # an axis the mesh lacks counts as size 1 (e.g. a kernel's own mesh of other axes)
    small = _FakeMesh({"data": 2, "tensor": 2})
    assert shd.logical_to_spec(("batch", "embed", "heads"), (8, 64, 4), small) == \
        P("data", None, "tensor")


def test_streaming_load_into_8_device_mesh(tmp_path):
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        import numpy as np, jax, jax.numpy as jnp
        from _hf_tiny import make_hf_model, batch, hf_logits
        from regift_jax.core import sharding as shd
        from regift_jax.models import checkpoints as ck
        from regift_jax.models.decoder import Decoder, param_shardings, positions_from_mask
        assert jax.device_count() == 8
        m = make_hf_model("qwen2")
        m.save_pretrained({str(tmp_path)!r})
        mesh = shd.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
        cfg0 = ck.ModelConfig.from_hf_config(ck.read_hf_config({str(tmp_path)!r}))
        shardings = param_shardings(cfg0, mesh)
        cfg, params = ck.load_hf({str(tmp_path)!r}, shardings=shardings)
        q = params["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding
        assert len(q.addressable_shards) == 8
        ids, mask = batch()
        with mesh:
            out = jax.jit(lambda p, i, mk: Decoder(cfg).apply({{"params": p}}, i,
                          positions=positions_from_mask(mk), segment_ids=mk))(
                params, jnp.asarray(ids), jnp.asarray(mask))
        diff = np.abs(np.asarray(out) - hf_logits(m, ids, mask))[mask.astype(bool)].max()
        assert diff <= 1e-4, diff
        print("OK", diff)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
