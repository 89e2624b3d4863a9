"""The methods under DistributedDataParallel (two CPU processes, gloo): each rank trains on
its own batches, and after every step the weights, the masks (buffers and mask
parameters) and the method's own state (DPF's mask schedule, L0's λ) must be identical on
both ranks, or the ranks' models drift apart. BatchNorm's running statistics are excluded:
DDP broadcasts buffers from rank 0 before each forward, so after the last forward each
rank holds its own batch's update (plain DDP behaviour)."""
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _model(name):
    if name == "vit":  # attention: SparseMultiheadAttention's projections under DDP
        import torchvision

        return torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                                    hidden_dim=8, mlp_dim=16, num_classes=10)
    from sparsekern.models import build_model

    return build_model(name, (3, 8, 8), 10)


def _train(rank, init_file, method_name, model_name, results):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from sparsekern import methods as M

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on both ranks, as DDP requires
    model = _model(model_name)
    method = {"dpf": lambda: M.DPF(model, sparsity=0.8, period=4),
              "l0": lambda: M.ConstrainedL0(model, target_density=0.5),
              # Structured: the BatchNorms after the gated convs are GatedBatchNorm2d.
              "l0 structured": lambda: M.ConstrainedL0(model, target_density=0.5, structured=True)}[method_name]()
    if method_name == "l0 structured":
        assert any(type(m).__name__ == "GatedBatchNorm2d" for m in model.modules())
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(method.param_groups(lr=0.05), momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(9):
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        loss = F.cross_entropy(ddp(x), y) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "running" not in k}
    state.update({f"method.{k}": v for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)})
    results[rank] = state
    dist.destroy_process_group()


@pytest.mark.parametrize("method_name, model_name", [("dpf", "resnet20"), ("l0", "resnet20"), ("l0 structured", "resnet20"),
                                                     ("l0", "vit")])
def test_ranks_stay_identical_under_ddp(method_name, model_name):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_train, args=(r, f"{tmp}/init", method_name, model_name, results)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0] * WORLD
        a, b = results[0], results[1]
    assert set(a) == set(b) and any(k.endswith(("weight_mask", "weight_log_alpha")) for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
