"""The GPU lane (``make test-gpu``): every estimator and layer in float32/float16/bfloat16 and under
autocast, Admin residuals, the sign optimizers, and no host-device synchronization in the hot paths.

Every test here is marked ``cuda`` and skipped without a CUDA device (conftest.py).
"""

import pytest
import torch

import admin_torch
import reinmax
import stability_toolbox
from reinmax import CategoricalLayer, DiscreteBottleneck, LatentTreeLSTM
from sign_optim import AddSign, CosineInternalDecay, PowerSign

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = sorted(reinmax.ESTIMATORS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_estimators_on_cuda(name, dtype):
    x = (torch.randn(64, 10, device="cuda") * 3).to(dtype).requires_grad_()
    y_hard, y_soft = reinmax.estimate(name, x, 1.3)
    assert y_hard.dtype == dtype and y_hard.device.type == "cuda"
    assert torch.equal(y_hard.sum(-1).float(), torch.ones(64, device="cuda"))
    torch.testing.assert_close(y_soft.float(), torch.softmax(x.detach().float(), -1), rtol=1e-2, atol=1e-3)
    (y_hard * torch.randn_like(y_hard)).sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_estimators_under_autocast_keep_the_logits_dtype(name, dtype):
    lin = torch.nn.Linear(16, 10).cuda()
    with torch.autocast("cuda", dtype=dtype):
        logits = lin(torch.randn(8, 16, device="cuda"))
        y_hard, y_soft = reinmax.estimate(name, logits, 1.3)
    assert logits.dtype == y_hard.dtype == y_soft.dtype == dtype
    y_hard.float().sum().backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_reinmax_cuda_gradient_is_the_cpu_formula():
    x = torch.randn(128, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    g, h = torch.randn_like(x), torch.randn_like(x)
    y_hard, y_soft = reinmax.reinmax(x, 1.3)
    ((y_hard * g).sum() + (y_soft * h).sum()).backward()
    pi0 = torch.softmax(x.detach(), -1)
    pi1 = (torch.softmax(x.detach() / 1.3, -1) + y_hard) / 2

    def J(p, v):
        return p * (v - (p * v).sum(-1, keepdim=True))
    torch.testing.assert_close(x.grad, 2 * J(pi1, g) - 0.5 * J(pi0, g) + J(pi0, h))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_layers_on_cuda(dtype, training):
    cat = CategoricalLayer("reinmax", 1.3).cuda().train(training)
    vq = DiscreteBottleneck(8, 4, 3, 2).cuda().to(dtype).train(training)
    tree = LatentTreeLSTM(4, 6).cuda().to(dtype).train(training)
    x = torch.randn(5, 4, device="cuda", dtype=dtype)
    assert torch.equal(cat(x).sum(-1).float(), torch.ones(5, device="cuda"))
    assert vq(torch.randn(5, 8, device="cuda", dtype=dtype)).shape == (5, 2, 3)
    root = tree(torch.randn(3, 6, 4, device="cuda", dtype=dtype), torch.tensor([6, 3, 1], device="cuda"))
    assert root.shape == (3, 6) and torch.isfinite(root.float()).all()


def test_hot_paths_make_no_host_sync():
    """With data checks off (the production setting), nothing in the hot paths waits for the GPU."""
    x = torch.randn(64, 10, device="cuda", requires_grad=True)
    tree = LatentTreeLSTM(4, 6).cuda()
    res = admin_torch.as_module(12, as_parameter=True, embed_dim=10).cuda()
    p = torch.nn.Parameter(torch.randn(10, device="cuda"))
    opt = PowerSign([p], lr=1e-3, sign_internal_decay=CosineInternalDecay(100))
    p.grad = torch.randn_like(p)
    opt.step()  # state creation happens once, outside the checked region
    lengths = torch.tensor([6, 3, 1], device="cuda")
    torch.cuda.synchronize()
    with stability_toolbox.data_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name in NAMES:
                y_hard, y_soft = reinmax.estimate(name, x, 1.3)
                (y_hard.sum() + y_soft.sum()).backward()
            tree(torch.randn(3, 6, 4, device="cuda"), lengths).sum().backward()
            res(x, x).sum().backward()
            p.grad = torch.randn_like(p)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_admin_residuals_and_stacks_on_cuda(dtype):
    res = admin_torch.as_module(12).cuda()
    x = torch.randn(4, 8, device="cuda", dtype=dtype)
    assert res(x, x).dtype == dtype
    for kind in admin_torch.reference_stack.STACK_KINDS:
        model = admin_torch.make_stack(kind, depth=2, dim=8, seed=0).cuda().to(dtype)
        assert torch.isfinite(model(torch.randn(2, 5, 8, device="cuda", dtype=dtype)).float()).all()


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_sign_optimizers_on_cuda_match_cpu(cls):
    torch.manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in [(33, 7), (5,)]]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = [cls(ps, lr=1e-2, weight_decay=0.01, sign_internal_decay=CosineInternalDecay(10)) for ps in (cpu, gpu)]
    for _ in range(5):
        for pc, pg in zip(cpu, gpu):
            g = torch.randn_like(pc)
            pc.grad, pg.grad = g, g.cuda()
        for opt in opts:
            opt.step()
    for pc, pg in zip(cpu, gpu):
        torch.testing.assert_close(pg.cpu(), pc, rtol=1e-5, atol=1e-6)


def test_reinmax_compiles_on_cuda():
    fn = torch.compile(lambda t: reinmax.reinmax(t, 1.3), fullgraph=True)
    x = torch.randn(256, 16, device="cuda", requires_grad=True)
    y_hard, y_soft = fn(x)
    (y_hard.sum() + (y_soft * y_soft).sum()).backward()
    assert torch.equal(y_hard.sum(-1), torch.ones(256, device="cuda")) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_capturable_step_makes_no_host_sync(cls):
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    opt = cls([p], lr=torch.tensor(1e-3, device="cuda"), capturable=True,
              sign_internal_decay=CosineInternalDecay(100))
    p.grad = torch.randn_like(p)
    opt.step()  # state creation once, outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.state[p]["step"].device.type == "cuda" and float(opt.state[p]["step"]) == 4


@pytest.mark.parametrize("router", reinmax.ROUTERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_ffn_on_cuda_matches_cpu_in_eval(router, dtype):
    layer = reinmax.RoutedFeedForward(16, 32, 4, router=router).eval()
    x = torch.randn(40, 16)
    expected = layer(x)
    layer = layer.cuda().to(dtype)
    y = layer(x.cuda().to(dtype))
    assert y.dtype == dtype and layer.stats.index.device.type == "cuda" and torch.isfinite(y.float()).all()
    if dtype == torch.float32:  # half precision may break near-ties of the argmax differently
        torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-5)
    layer.train()
    out = layer(x.cuda().to(dtype).requires_grad_())
    out.float().pow(2).mean().add(0.01 * layer.stats.balance_loss).backward()
    assert torch.isfinite(layer.router.weight.grad.float()).all()


@pytest.mark.parametrize("router", reinmax.SPARSE_ROUTERS)
def test_routed_ffn_with_capacity_makes_no_host_sync_and_compiles(router):
    layer = reinmax.RoutedFeedForward(16, 32, 4, router=router, capacity_factor=1.25).cuda()
    x = torch.randn(64, 16, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # warm-up
    torch.cuda.synchronize()
    with stability_toolbox.data_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            (layer(x).sum() + layer.stats.balance_loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_fused_triton_kernel_on_fsdp2_local_shards(cls, tmp_path):
    """FSDP2 on one CUDA rank: DTensor parameters whose local shards go to the Triton kernel, equal to foreach."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        results = []
        for kw in ({"fused": True}, {"foreach": True}):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
            fully_shard(model, mesh=mesh)
            opt = cls(model.parameters(), lr=1e-2, sign_internal_decay=CosineInternalDecay(10), **kw)
            x = torch.randn(8, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            for _ in range(3):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            results.append([p.full_tensor().detach().cpu() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
