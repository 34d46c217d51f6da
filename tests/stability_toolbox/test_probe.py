"""stability_toolbox.probe: the probe inputs as a call, captured detached from a forward pass, dropped with a
failed step, replayed in eval mode without touching the random state or the training flags, and named when
the model refuses them."""

import pytest
import torch
from torch import nn

from stability_toolbox.probe import Probe, as_call
from stability_toolbox.quantities import Recorder


def test_as_call():
    x = torch.randn(2, 3)
    assert as_call(x) == ((x,), {})
    assert as_call([x, 3]) == ((x, 3), {})
    given = {"input_ids": x}
    args, kwargs = as_call(given)
    assert args == () and kwargs == given and kwargs is not given
    with pytest.raises(TypeError, match="probe must be a tensor"):
        as_call("x")


class _Seen(nn.Module):
    """Records (training flag, input) of each call; dropout makes the random state matter."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)
        self.seen = []

    def forward(self, x, scale=1.0):
        self.seen.append((self.training, x.clone()))
        return self.drop(self.lin(x * scale))


def test_capture_detaches_and_forget_step_drops_a_failed_steps_probe():
    model, rec = _Seen(), Recorder(probe_rows=2)
    probe = Probe(model, rec)
    assert not probe.given and not probe.run()  # nothing to replay yet
    x = torch.randn(2, 4, requires_grad=True)
    probe.capture((x,), {"scale": 2.0}, step=5)
    (kept,), kwargs = probe.call
    assert not kept.requires_grad and kept is not x and torch.equal(kept, x) and kwargs == {"scale": 2.0}
    assert probe.step == 5
    probe.forget_step(5, failed=False)  # a logged step that succeeded: the probe stays, no longer "its"
    assert probe.call is not None and probe.step is None
    probe.capture((x,), {}, step=6)
    probe.forget_step(6, failed=True)  # taken from a failed step's inputs: the next logged step takes a new one
    assert probe.call is None and probe.step is None
    other = Recorder(probe_rows=2)
    with other.probing():  # another monitor's probe pass is no input of this model's training
        probe.capture((x,), {}, step=7)
    assert probe.call is None


def test_run_replays_in_eval_mode_and_leaves_the_random_state_and_training_flags():
    model, rec = _Seen(), Recorder(probe_rows=2)
    x = torch.randn(2, 4)
    probe = Probe(model, rec, as_call(x))
    assert probe.given and probe.step is None
    model.train()
    state = torch.random.get_rng_state()
    phases = []
    model.register_forward_pre_hook(lambda m, a: phases.append(rec.phase))
    assert probe.run()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and model.drop.training and rec.phase == "train" and not rec.foreign
    assert phases == ["probe"] and model.seen[-1][0] is False and torch.equal(model.seen[-1][1], x)


def test_a_refused_probe_is_named_and_the_model_left_as_it_was():
    model, rec = _Seen(), Recorder(probe_rows=2)
    model.train()
    probe = Probe(model, rec, as_call(torch.randn(2, 7)))  # wrong feature size
    with pytest.raises(ValueError, match=r"probe: the model refused the probe= inputs \(RuntimeError"):
        probe.run()
    assert model.training and rec.phase == "train" and not Recorder(1).foreign
    probe = Probe(model, rec)
    probe.capture((torch.randn(2, 7),), {}, step=0)
    with pytest.raises(ValueError, match="the first logged step's inputs"):
        probe.run()


def test_the_probe_follows_the_model_to_another_dtype():
    model, rec = _Seen(), Recorder(probe_rows=2)
    x, mask = torch.randn(2, 4), torch.tensor([[1], [0]])
    probe = Probe(model, rec, ((x,), {"scale": mask}))
    model.to(torch.float64)
    assert probe.run()
    (moved,), kwargs = probe.call
    assert moved.dtype == torch.float64 and kwargs["scale"].dtype == torch.int64  # integer inputs keep theirs
    assert model.seen[-1][1].dtype == torch.float64
