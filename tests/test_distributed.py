"""Models built on effkernels train under DistributedDataParallel: a 2-process gloo run on CPU
gives, after one step, the same all-reduced gradients and parameters as timm's model under
DDP with the same data (BatchNorm statistics are per process in both, as nn.BatchNorm2d)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

timm = pytest.importorskip("timm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from effkernels import models

        torch.manual_seed(0)  # same initial weights on every rank
        theirs = timm.create_model("mobilenetv3_small_050", num_classes=10)
        ours = models.create_model("mobilenetv3_small_050", num_classes=10)
        ours.load_state_dict(theirs.state_dict())
        ours, theirs = ours.double(), theirs.double()  # compare semantics, not fp32 rounding
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        x = torch.randn(4, 3, 40, 40, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        results = {}
        for name, model in (("ours", ours), ("theirs", theirs)):
            ddp = DDP(model.train())
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            results[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            results[name + "_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_timm(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:
        for name, grad in r["theirs"].items():
            ours = r["ours"][name]
            assert torch.allclose(ours, grad, rtol=1e-9, atol=1e-12), name
        for key, value in r["theirs_state"].items():
            assert torch.allclose(r["ours_state"][key].double(), value.double(), rtol=1e-9,
                                  atol=1e-12), key
    # DDP all-reduced the gradients: identical on both ranks though their data differ
    for name in ranks[0]["ours"]:
        assert torch.equal(ranks[0]["ours"][name], ranks[1]["ours"][name]), name


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from effkernels import models

        results = {}
        for name in SYNC_MODELS:
            torch.manual_seed(0)
            model = models.create_model(name, num_classes=10).double()
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
            x, y = _sync_batch()
            shard = slice(rank * 3, rank * 3 + 3)
            xs = x[shard].clone().requires_grad_()
            out = model(xs)
            loss = torch.nn.functional.cross_entropy(out, y[shard], reduction="sum") / len(x)
            loss.backward()
            grads = {}
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad)  # the full batch's gradient = the sum over ranks
                grads[n] = p.grad.clone()
            results[name] = dict(out=out.detach(), x_grad=xs.grad, grads=grads,
                                 state={k: v.clone() for k, v in model.state_dict().items()})
        torch.save(results, os.path.join(out_dir, f"sync{rank}.pt"))
    finally:
        dist.destroy_process_group()


SYNC_MODELS = ["mobilenetv3_small_050", "mixnet_s"]


def _sync_batch():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(6, 3, 32, 40, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (6,), generator=g))


def test_sync_batchnorm_equals_full_batch(tmp_path):
    """nn.SyncBatchNorm.convert_sync_batchnorm(effkernels model) on 2 processes with 3 images
    each = the same model on the 6 images in one process: outputs, input and parameter
    gradients, running statistics (torch's own SyncBatchNorm does not run on CPU)."""
    from effkernels import models

    world = 2
    mp.spawn(_sync_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"sync{r}.pt") for r in range(world)]
    x, y = _sync_batch()
    for name in SYNC_MODELS:
        torch.manual_seed(0)
        model = models.create_model(name, num_classes=10).double().train()
        xf = x.clone().requires_grad_()
        out = model(xf)
        torch.nn.functional.cross_entropy(out, y, reduction="sum").div(len(x)).backward()
        for rank, r in enumerate(ranks):
            shard = slice(rank * 3, rank * 3 + 3)
            got = r[name]
            torch.testing.assert_close(got["out"], out[shard].detach(), rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(got["x_grad"], xf.grad[shard], rtol=1e-9, atol=1e-12)
            for n, p in model.named_parameters():
                torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-8, atol=1e-12,
                                           msg=lambda m: f"{name} grad {n}: {m}")
            for k, v in model.state_dict().items():
                torch.testing.assert_close(got["state"][k], v, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"{name} {k}: {m}")
