"""reinmax.expert_parallel in one process: the argument checks, and a 1-rank gloo group (the exchanges are then
identities, so the expert-parallel code path must give exactly the plain layer's numbers); copies, pickling,
state dicts and the optimizer-state helpers. The 2- and 4-rank checks against one process are in
tests/distributed/test_expert_parallel.py."""

import copy
import pickle

import pytest
import torch
import torch.distributed as dist

from reinmax import SPARSE_ROUTERS, RoutedFeedForward, expert_parallel

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def pair(router, capacity, group):
    torch.manual_seed(0)
    plain = RoutedFeedForward(6, 8, 4, router=router, tau=1.3, capacity_factor=capacity).double()
    torch.manual_seed(0)
    parallel = RoutedFeedForward(6, 8, 4, router=router, tau=1.3, capacity_factor=capacity,
                                 expert_parallel_group=group).double()
    return plain, parallel


def test_no_group_is_the_identity_exchange():
    x = torch.randn(4, 3)
    assert expert_parallel.all_to_all(x, None) is x
    assert RoutedFeedForward(6, 8, 4).expert_parallel_group is None


@pytest.mark.parametrize("bad", ["world", 3, object()])
def test_a_group_of_the_wrong_type_is_refused_by_name(bad, group):
    with pytest.raises(TypeError, match="expert_parallel_group must be None, a torch.distributed ProcessGroup"):
        RoutedFeedForward(6, 8, 4, expert_parallel_group=bad)


@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("router", SPARSE_ROUTERS)
def test_one_rank_group_gives_exactly_the_plain_layer(router, capacity, group):
    plain, parallel = pair(router, capacity, group)
    x = torch.randn(9, 6, dtype=torch.float64) * 2
    outs, grads = [], []
    for layer in (plain, parallel):
        xi = x.clone().requires_grad_(True)
        y = layer(xi, generator=torch.Generator().manual_seed(3))
        (y.pow(2).sum() + layer.stats.balance_loss).backward()
        outs.append((y.detach(), layer.stats.dropped, layer.stats.index))
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_all_to_all_gradient_is_the_reverse_exchange(group):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expert_parallel.all_to_all(t, group, [5], [5]) * 2.0, (x,))


def test_a_one_dimensional_device_mesh_is_accepted(group):
    from torch.distributed.device_mesh import init_device_mesh

    layer = RoutedFeedForward(6, 8, 4, expert_parallel_group=init_device_mesh("cpu", (1,)))
    assert layer.expert_parallel_group is not None and list(layer.expert_range()) == [0, 1, 2, 3]


def test_copies_share_the_group_and_pickling_is_refused_naming_state_dict(group):
    _, layer = pair("switch", 1.0, group)
    layer(torch.randn(3, 6, dtype=torch.float64))
    twin = copy.deepcopy(layer)
    assert twin.expert_parallel_group is layer.expert_parallel_group and twin.stats is None
    ones = torch.ones(2, 6, dtype=torch.float64)
    torch.testing.assert_close(twin(ones), layer(ones))
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(layer)
    plain, _ = pair("switch", 1.0, None)
    assert pickle.loads(pickle.dumps(plain)).expert_parallel_group is None  # a plain layer still pickles


def test_state_dict_holds_dtensor_views_and_gather_experts_full_tensors(group):
    from torch.distributed.tensor import DTensor

    plain, layer = pair("switch", None, group)
    state = layer.state_dict()
    assert isinstance(state["fc1_weight"], DTensor) and state["fc1_weight"].shape == (4, 8, 6)
    assert not isinstance(state["router.weight"], DTensor)
    expert_parallel.gather_experts(layer)
    full = layer.state_dict()
    assert not isinstance(full["fc1_weight"], DTensor) and torch.equal(full["fc1_weight"], plain.fc1_weight)
    assert isinstance(layer.state_dict()["fc1_weight"], DTensor)  # one state_dict only
    other = pair("switch", None, group)[1]
    torch.nn.init.zeros_(other.fc1_weight)
    other.load_state_dict(plain.state_dict())  # a single-process state dict
    assert torch.equal(other.fc1_weight, plain.fc1_weight)
    other.load_state_dict(state)  # DTensors
    assert torch.equal(other.fc2_bias, plain.fc2_bias)


def test_optimizer_state_round_trip_and_gradient_helpers(group):
    _, layer = pair("sparsemixer", None, group)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(7, 6, dtype=torch.float64)).pow(2).sum().backward()
    local, every = expert_parallel.expert_grad_square_norms(layer)
    want = sum(getattr(layer, n).grad.pow(2).sum() for n in expert_parallel.EXPERT_PARAMETERS)
    torch.testing.assert_close(local.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(every, local)
    before = layer.fc1_weight.grad.clone()
    expert_parallel.reduce_expert_gradients(layer)  # W = 1: unchanged
    assert torch.equal(layer.fc1_weight.grad, before)
    assert expert_parallel.expert_parameter_names(torch.nn.Sequential(layer)) == \
        [f"0.{n}" for n in expert_parallel.EXPERT_PARAMETERS]
    opt.step()
    live = {id(p): dict(opt.state[p]) for p in layer.parameters()}
    state = expert_parallel.gather_optimizer_state(layer, opt)
    for p in layer.parameters():  # the optimizer keeps its own state (a trainer continues after a save)
        assert all(opt.state[p][k] is v for k, v in live[id(p)].items())
    again = expert_parallel.shard_optimizer_state(layer, opt, copy.deepcopy(state))
    opt.load_state_dict(again)
    for p in layer.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape


def test_the_exchange_is_differentiable_twice(group):
    """The backward of all_to_all is an all_to_all too: a double backward (a gradient penalty) keeps its terms."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: expert_parallel.all_to_all(t, group, [5], [5]).pow(3), (x,))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_equals_torch_on_one_rank(group, norm_type):
    """One rank holds every expert: the helper is torch.nn.utils.clip_grad_norm_ (the norm, the clipped grads)."""
    layers = [pair("sparsemixer", None, group)[1], pair("sparsemixer", None, None)[0]]
    for layer in layers:
        layer(torch.arange(42.0, dtype=torch.float64).view(7, 6) / 10, generator=torch.Generator().manual_seed(0)) \
            .pow(2).sum().backward()
    norm = expert_parallel.clip_grad_norm_(layers[0], 0.1, norm_type)
    want = torch.nn.utils.clip_grad_norm_(layers[1].parameters(), 0.1, norm_type)
    assert want > 0.2  # the clipping is active
    torch.testing.assert_close(norm, want, rtol=1e-12, atol=0)
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_norm=-1.0), ValueError, "max_norm must be a finite real number >= 0"),
    (dict(max_norm="1"), TypeError, "max_norm must be a finite real number"),
    (dict(max_norm=1.0, norm_type=0.0), ValueError, "norm_type must be a real number > 0"),
    (dict(max_norm=1.0, norm_type=float("nan")), ValueError, "norm_type must be a real number > 0"),
])
def test_clip_grad_norm_refuses_bad_arguments_changing_nothing(kwargs, error, message):
    layer = RoutedFeedForward(6, 8, 4)
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    with pytest.raises(error, match=message):
        expert_parallel.clip_grad_norm_(layer, **kwargs)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, layer.parameters()))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        expert_parallel.clip_grad_norm_(layer.parameters(), 1.0)
