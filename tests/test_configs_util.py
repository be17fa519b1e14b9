"""configs_util.apply_xla_cpu_flags: the base config's XLA CPU flags reach XLA_FLAGS on a CPU-only
install, never override a flag the user set, and stay off for accelerator platforms."""

import pytest

from regift_jax.core import configs_util

FLAGS = configs_util.XNNPACK_DOT_FLAGS


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(configs_util, "_accelerator_plugin_installed", lambda: False)


def test_off_by_default():
    env = {}
    assert configs_util.base_config().xla_cpu_flags == ""
    assert configs_util.apply_xla_cpu_flags(configs_util.base_config().xla_cpu_flags, env) == ""
    assert "XLA_FLAGS" not in env


def test_flags_are_appended_to_an_empty_environment():
    env = {}
    out = configs_util.apply_xla_cpu_flags(FLAGS, env)
    assert out == env["XLA_FLAGS"] == FLAGS
    assert "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in out


def test_user_flags_are_kept_and_win():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    out = configs_util.apply_xla_cpu_flags(FLAGS, env)
    parts = out.split()
    assert parts[0] == "--xla_force_host_platform_device_count=8"
    assert "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT" in parts
    assert "--xla_cpu_experimental_ynn_fusion_type=" not in parts  # the user's value wins
    assert "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in parts
    assert configs_util.apply_xla_cpu_flags(FLAGS, env) == out  # idempotent


@pytest.mark.parametrize("env", [{"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu"}])
def test_accelerator_platforms_get_nothing(env):
    assert configs_util.apply_xla_cpu_flags(FLAGS, env) == ""
    assert "XLA_FLAGS" not in env


def test_installed_accelerator_plugin_or_empty_flags_get_nothing(monkeypatch):
    assert configs_util.apply_xla_cpu_flags("", {}) == ""
    monkeypatch.setattr(configs_util, "_accelerator_plugin_installed", lambda: True)
    env = {"JAX_PLATFORMS": "cpu"}
    assert configs_util.apply_xla_cpu_flags(FLAGS, env) == "" and "XLA_FLAGS" not in env


def test_command_line_values_resolve():
    assert configs_util.resolve_xla_cpu_flags("config") == configs_util.base_config().xla_cpu_flags
    assert configs_util.resolve_xla_cpu_flags("xnnpack") == FLAGS
    assert configs_util.resolve_xla_cpu_flags("") == ""
    assert configs_util.resolve_xla_cpu_flags("--xla_cpu_foo=1") == "--xla_cpu_foo=1"
