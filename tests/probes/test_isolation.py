"""A probe that raises is isolated: the step goes on, the error is an event, and after
repeated failures the probe is switched off."""

from pathlib import Path

import torch

from tests.helpers import make_trainer
from yoto import catalog, runstore
from yoto.probes.base import HookGuard, Sample


class Flaky:
    name = "flaky"
    every = 1

    def __init__(self) -> None:
        self.calls = 0
        self.guard = HookGuard()

    def on_micro_step(self, ctx):
        return ()

    def on_step(self, ctx):
        self.calls += 1
        if ctx.step in (3, 5, 6, 7):
            raise RuntimeError(f"broken at {ctx.step}")
        return [Sample(catalog.LOSS_SCALE.name, 1.0)]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class BadHook:
    """Raises inside a backward hook, where an exception would otherwise kill the step."""

    name = "bad_hook"
    every = 1

    def __init__(self) -> None:
        self.guard = HookGuard()
        self.handle = None

    def attach(self, model, engine):
        p = next(model.parameters())
        self.handle = p.register_hook(lambda g: self.guard.run(self._boom, g))

    def _boom(self, g: torch.Tensor) -> None:
        raise ValueError("hook exploded")

    def detach(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def active(self, step):
        pass

    on_micro_step = Flaky.on_micro_step
    state_dict = Flaky.state_dict
    load_state_dict = Flaky.load_state_dict

    def on_step(self, ctx):
        return ()


def test_failing_probes_are_isolated_and_disabled(tmp_path: Path) -> None:
    flaky, bad = Flaky(), BadHook()
    trainer, store = make_trainer(tmp_path, "train.steps=10", probes=[flaky, bad])
    bad.attach(trainer.engine.module, trainer.engine)
    trainer.fit()
    store.close("finished")
    t = runstore.read_metrics(store.path).to_pydict()
    assert t["step"] == list(range(1, 11))  # every step completed and was recorded
    assert all(v is not None for v in t[catalog.TRAIN_LOSS.name])
    scale = t[catalog.LOSS_SCALE.name]
    assert scale[1] == 1.0 and scale[2] is None  # the failing step's sample was dropped
    assert scale[3] == 1.0 and scale[7:] == [None, None, None]  # off after 3 in a row
    assert flaky.calls == 7  # never called again once disabled
    events = [e for e in runstore.read_events(store.path) if e["kind"] == "probe"]
    flaky_events = [e for e in events if e["data"]["probe"] == "flaky"]
    assert [e["step"] for e in flaky_events] == [3, 5, 6, 7]
    assert flaky_events[-1]["data"]["disabled"] is True
    assert "RuntimeError: broken at 7" in flaky_events[-1]["message"]
    hook_events = [e for e in events if e["data"]["probe"] == "bad_hook"]
    assert len(hook_events) == 3 and "ValueError: hook exploded" in hook_events[0]["message"]
    assert bad.handle is None  # detached when disabled
    failures = t[catalog.PROBE_FAILURES.key(probe="flaky")]
    assert failures[-1] == 4
