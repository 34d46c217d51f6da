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


@pytest.mark.parametrize("as_dtensor", [False, True])
def test_a_state_dict_with_another_expert_count_is_a_value_error_naming_the_key(group, as_dtensor):
    """A checkpoint of an 8-expert layer into a 4-expert one: the key and both counts, not torch's RuntimeError
    (nor, for a DTensor, this rank's rows of the wrong experts), and the layer is unchanged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    _, layer = pair("switch", None, group)
    torch.manual_seed(1)
    state = RoutedFeedForward(6, 8, 8, router="switch").double().state_dict()
    if as_dtensor:
        mesh = init_device_mesh("cpu", (1,))
        state = {k: DTensor.from_local(v, mesh, [Shard(0)]) if k.startswith("fc") else v for k, v in state.items()}
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['fc1_weight'\] must have 4 \(every expert\).*"
                                         r"num_experts=4 over P=1 ranks, E/P=4\), got shape \(8, 8, 6\)"):
        layer.load_state_dict(state)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fully_shard_experts_refuses_a_mesh_of_the_wrong_kind(group):
    from torch.distributed.device_mesh import init_device_mesh

    _, layer = pair("switch", 1.0, group)
    with pytest.raises(TypeError, match="mesh must be a torch.distributed DeviceMesh, got str"):
        expert_parallel.fully_shard_experts(layer, "dp")
    with pytest.raises(ValueError, match="mesh must be a 2-D DeviceMesh with dimensions named 'dp'"):
        expert_parallel.fully_shard_experts(layer, init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)))
    assert not any(type(m).__name__.startswith("FSDP") for m in layer.modules())  # nothing was sharded


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


def test_a_copy_does_not_take_the_experts_gathered_for_the_original(group):
    """gather_experts(model) leaves the full experts for model's next state_dict only: a deepcopy (an EMA model)
    holds its own experts, and its state_dict must not return the original's."""
    _, layer = pair("switch", None, group)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.fc1_weight.add_(1.0)
    expert_parallel.gather_experts(layer)
    twin_state = twin.state_dict()["fc1_weight"]
    torch.testing.assert_close(twin_state.full_tensor(), layer.fc1_weight.detach() + 1.0, rtol=0, atol=0)
    assert torch.equal(layer.state_dict()["fc1_weight"], layer.fc1_weight)  # the original's gathered experts


def test_a_state_dict_after_the_experts_changed_since_gather_experts_is_refused(group):
    """gather_experts, then an optimizer step, then state_dict: a ValueError, not the gathered (stale) experts."""
    _, layer = pair("switch", None, group)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    expert_parallel.gather_experts(layer)
    layer(torch.randn(5, 6, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="experts changed after gather_experts.*right before state_dict"):
        layer.state_dict()
    assert torch.equal(layer.state_dict()["fc1_weight"].to_local(), layer.fc1_weight)  # the DTensor views again


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0])
def test_a_state_dict_entry_that_is_not_a_tensor_is_a_type_error_naming_the_key(group, value):
    _, layer = pair("switch", None, group)
    state = dict(layer.state_dict(), fc2_bias=value)
    before = layer.fc2_bias.detach().clone()
    with pytest.raises(TypeError, match=r"state_dict\['fc2_bias'\] must be a torch.Tensor"):
        layer.load_state_dict(state)
    assert torch.equal(layer.fc2_bias, before)
