"""The pod launchers: their --dry-run commands, and what those commands export per process.

No SLURM and no TPU here: the dry-run output is parsed with ``shlex``, then
the job script (SLURM) and the per-host command (TPU) are executed with
stand-ins for the cluster tools (``scontrol``/``srun``, the metadata
server's ``curl``) and for python (prints its environment and argv), so the
test sees exactly which JAX_* variables each launch.train process would get.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A stand-in for python: prints the JAX_* variables and its arguments as JSON.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"env": {{k: v for k, v in os.environ.items() if k.startswith("JAX_")}},
                   "argv": sys.argv[1:], "cwd": os.getcwd()}}))
"""
# srun: runs the command once per task with the variables SLURM gives each task.
FAKE_SRUN = """#!/usr/bin/env bash
nodes=1; per=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#*=} ;; --ntasks-per-node=*) per=${1#*=} ;; esac; shift
done
n=$((nodes * per))
for ((i = 0; i < n; i++)); do
  SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit $?
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] && printf 'gpu-07\\ngpu-08\\n'
"""
# The TPU VM metadata server, old 'name:id:ip' format of worker-network-endpoints.
FAKE_CURL = """#!/usr/bin/env bash
case "${@: -1}" in
  */worker-network-endpoints) printf 'w0:0:10.0.0.5,w1:1:10.0.0.6,w2:2:10.0.0.7,w3:3:10.0.0.8' ;;
  */agent-worker-number) printf '%s' "$FAKE_WORKER" ;;
  *) exit 22 ;;
esac
"""


def _clean_env(**extra):
  """This environment without the JAX_* variables the test process itself has."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  return dict(env, **extra)


def _tools(tmp_path, **scripts):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


def _run(script, *args, env=None):
  return subprocess.run(["bash", f"launch/{script}", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, env=env)


def _train_args(argv):
  """The launch.train part of an argv: {flag: value} and the --config.* overrides."""
  i = argv.index("launch.train")
  assert argv[i - 1] == "-m"
  rest = argv[i + 1:]
  flags = {rest[j]: rest[j + 1] for j in range(len(rest) - 1)
           if rest[j] in ("--config", "--workdir")}
  return flags, [a for a in rest if a.startswith("--config.")]


def test_slurm_dry_run_and_per_task_environment(tmp_path):
  workdir = tmp_path / "run dir"
  r = _run("slurm_gpu.sh", "--nodes", 2, "--gpus-per-node", 2, "--config",
           "configs/tiny.py:micro", "--workdir", workdir, "--partition", "gpu", "--port", 2345,
           "--python", tmp_path / "bin" / "python", "--repo", tmp_path, "--dry-run",
           "--config.train.total_steps=5")
  assert r.returncode == 0, r.stderr
  assert not workdir.exists()                       # a dry run writes nothing
  lines = r.stdout.splitlines()
  assert lines[0] == f"# {workdir}/slurm_job.sbatch:"
  assert shlex.split(lines[-1]) == ["sbatch", f"{workdir}/slurm_job.sbatch"]
  body = "\n".join(lines[1:-2]) + "\n"
  for directive in ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--partition=gpu"):
    assert f"#SBATCH {directive}" in body
  srun = shlex.split(next(l for l in lines if l.startswith("srun ")))
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1"]
  flags, overrides = _train_args(srun)
  assert flags == {"--config": "configs/tiny.py:micro", "--workdir": str(workdir)}
  assert overrides == ["--config.train.total_steps=5"]

  # The job script as SLURM would run it: one process per GPU, 4 in all.
  bin_dir = _tools(tmp_path, python=FAKE_PYTHON, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
  (tmp_path / "job.sh").write_text(body)
  env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[07-08]")
  out = subprocess.run(["bash", tmp_path / "job.sh"], capture_output=True, text=True, env=env,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  procs = [json.loads(l) for l in out.stdout.splitlines()]
  assert [p["env"] for p in procs] == [
      {"JAX_COORDINATOR_ADDRESS": "gpu-07:2345", "JAX_NUM_PROCESSES": "4",
       "JAX_PROCESS_ID": str(i), "JAX_LOCAL_DEVICE_IDS": str(i % 2)} for i in range(4)]
  assert procs[0]["argv"] == ["-m", "launch.train", "--config", "configs/tiny.py:micro",
                              "--workdir", str(workdir), "--no-progress",
                              "--config.train.total_steps=5"]
  assert procs[0]["cwd"] == str(tmp_path)


def test_tpu_dry_run_and_per_host_environment(tmp_path):
  r = _run("tpu_pod.sh", "--tpu", "my-v4-32", "--zone", "us-central2-b", "--project", "proj",
           "--config", "configs/demo.py:stage=base", "--workdir", "/mnt/shared/base run",
           "--python", tmp_path / "bin" / "python", "--repo", tmp_path, "--dry-run",
           "--config.train.batch_size=64")
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout.strip().splitlines()[-1])
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32",
                      "--zone=us-central2-b", "--project=proj"]
  assert "--worker=all" in argv
  remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
  flags, overrides = _train_args(shlex.split(remote.rsplit("exec ", 1)[1]))
  assert flags == {"--config": "configs/demo.py:stage=base", "--workdir": "/mnt/shared/base run"}
  assert overrides == ["--config.train.batch_size=64"]

  # What each host runs, against a stand-in metadata server: 4 hosts, worker 0 coordinates.
  bin_dir = _tools(tmp_path, python=FAKE_PYTHON, curl=FAKE_CURL)
  for worker in (0, 3):
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_WORKER=str(worker))
    out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    proc = json.loads(out.stdout)
    assert proc["env"] == {"JAX_COORDINATOR_ADDRESS": "10.0.0.5:8482", "JAX_NUM_PROCESSES": "4",
                           "JAX_PROCESS_ID": str(worker)}
    assert proc["argv"][-1] == "--config.train.batch_size=64" and proc["cwd"] == str(tmp_path)

  # --workers fixes the process count in the command itself.
  r = _run("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--config", "configs/tiny.py",
           "--workdir", "/w", "--workers", 8, "--dry-run")
  assert "export JAX_NUM_PROCESSES=8;" in shlex.split(r.stdout.splitlines()[-1])[-1]


def test_bad_arguments_exit_2_with_one_line():
  for script, args, match in [
      ("slurm_gpu.sh", ["--gpus-per-node", "8", "--config", "c", "--workdir", "/w"], "--nodes"),
      ("slurm_gpu.sh", ["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w"], "--config"),
      ("slurm_gpu.sh", ["--nodes", "2", "--gpus-per-node", "8", "--config", "c", "--workdir",
                        "/w", "--bogus"], "unknown argument '--bogus'"),
      ("tpu_pod.sh", ["--zone", "z", "--config", "c", "--workdir", "/w"], "--tpu"),
      ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "rel"],
       "absolute"),
      ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "/w",
                      "--workers", "two"], "--workers")]:
    r = _run(script, *args, "--dry-run")
    assert r.returncode == 2 and r.stdout == "", (script, args, r.stdout)
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, (script, r.stderr)
