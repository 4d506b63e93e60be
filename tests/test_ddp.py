"""DistributedDataParallel on the CPU: two gloo processes launched by torchrun on 127.0.0.1.

One launch runs the checks of `_train_worker._ddp`; the test then compares what each rank
saved: replicas in sync, equal to one process on the same global batch, and an exact resume.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_worker import DenoiseObjective, tiny_config
from minidit.run.checkpoint import read_checkpoint
from minidit.run.engine import train

WORKER = Path(__file__).with_name("_train_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MINIDIT_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), "ddp", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_replicas_stay_in_sync(ddp_run):
    for name in ("denoise", "resumed"):
        rank0 = torch.load(ddp_run / f"{name}_rank0.pt", weights_only=True)
        rank1 = torch.load(ddp_run / f"{name}_rank1.pt", weights_only=True)
        assert _same(rank0, rank1), name


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(ddp_run, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = train(tiny_config(tmp_path, steps=6), progress=False, objective=DenoiseObjective())
    torch.set_num_threads(threads)
    ddp = torch.load(ddp_run / "denoise_rank0.pt", weights_only=True)
    for k, v in single["model"].state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_ranks_draw_different_noise_and_resume_exactly(ddp_run):
    straight = read_checkpoint(ddp_run / "straight" / "latest.pt")
    resumed = read_checkpoint(ddp_run / "resumed" / "latest.pt")
    # each rank has its own random stream and its own shard position
    assert len(straight["rng"]) == 2
    assert not torch.equal(straight["rng"][0]["generator"], straight["rng"][1]["generator"])
    assert straight["data"] == [{"micro_step": 8}, {"micro_step": 8}]
    # 4 steps, a restart of both processes, 4 more == 8 steps straight
    assert resumed["step"] == straight["step"] == 8
    assert _same(resumed["model"], straight["model"])
    assert _same(resumed["ema"]["model"], straight["ema"]["model"])
