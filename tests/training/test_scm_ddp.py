"""sCT under 2-rank CPU DDP (Lightning, gloo): after one step every trained parameter's gradient, the network's and
SCMLoss's own adaptive weight's, equals that of one process on the same global batch with the same draws.

What keeps both synchronised: SCMLoss is an nn.Module held as DiffusionModule.loss_fn, so its parameters are inside
the module Lightning wraps in DistributedDataParallel, and the whole loss, the JVP of the network included, runs in
training_step, inside the wrapper's forward (tests/training/test_meanflow_ddp.py shows that a JVP of the unwrapped
network outside that forward skips the all-reduce).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from diffusion_pl.prediction import precondition
from tests.support.paths import REPO, WORKERS, repo_pythonpath
from tests.workers.scm_ddp import global_batch, make_module, trained_grads


def _run_worker(tmp_path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    env.update({"PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    proc = subprocess.Popen([sys.executable, str(WORKERS / "scm_ddp.py"), str(tmp_path)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and the rank Lightning started
        out = proc.communicate()[0].decode(errors="replace")
        pytest.fail(f"the 2-rank sCT step did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_rank_scm_gradients_equal_one_process(tmp_path):
    _run_worker(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    # the two ranks split the global batch (DistributedSampler: rank r gets samples r, r + 2, ...)
    torch.testing.assert_close(torch.cat([r["x0"] for r in ranks]).sort(0).values, global_batch().sort(0).values)

    # one process: the same module, each half with its rank's draws, the mean over all 8 samples
    module = make_module()
    model = precondition(module.net, module.process, module.prediction)
    halves = []
    for saved in ranks:
        torch.set_rng_state(saved["rng_state"])
        halves.append(module.loss_fn(model, saved["x0"], module.process, module.prediction, None, None,
                                     step=0, images_seen=0).loss)
    params = dict(module.named_parameters())
    names = [k for k, p in params.items() if p.requires_grad]
    assert any(k.startswith("loss_fn.") for k in names) and any(k.startswith("net.") for k in names)
    own = [torch.autograd.grad(h.mean(), [params[k] for k in names], retain_graph=True) for h in halves]
    torch.cat(halves).mean().backward()
    single = trained_grads(module)

    for rank, saved in enumerate(ranks):
        assert set(saved["grads"]) == set(names), f"rank {rank} trained other parameters"
        for name in names:
            assert saved["grads"][name] is not None, f"rank {rank}: {name} got no gradient"
            torch.testing.assert_close(saved["grads"][name], single[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank}, {name}: {m}")
    # the comparison can fail: a rank's own half gives another gradient, for the loss's parameters as for the net's
    for prefix in ("net.", "loss_fn."):
        assert any(not torch.allclose(own[0][i], single[k], rtol=1e-3, atol=1e-6)
                   for i, k in enumerate(names) if k.startswith(prefix)), prefix
