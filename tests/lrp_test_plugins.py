"""Method plugins used by the tests: they prove the trainer calls every hook, and inject faults."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lrpretrain.methods import Method, MethodConfig, StepContext, register_method


@dataclass
class RecorderConfig(MethodConfig):
    factor: float = 0.5  # multiplies the LR through lr_factor


@register_method("test_recorder")
class Recorder(Method):
    """Full-rank training that records every hook call."""

    Config = RecorderConfig
    calls: ClassVar[list[Any]] = []

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.counter = 0

    def prepare_model(self, model):
        self.calls.append("prepare_model")
        return model

    def param_groups(self, model, optim_cfg):
        self.calls.append("param_groups")
        return super().param_groups(model, optim_cfg)

    def build_optimizer(self, groups, optim_cfg):
        self.calls.append("build_optimizer")
        return super().build_optimizer(groups, optim_cfg)

    def lr_factor(self, step):
        self.calls.append(("lr_factor", step))
        return self.cfg.factor

    def after_step(self, ctx: StepContext):
        self.counter += 1
        self.calls.append(("after_step", ctx.step))
        ctx.log({"recorder_counter": self.counter})

    def state_dict(self):
        self.calls.append("state_dict")
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.calls.append(("load_state_dict", state["counter"]))
        self.counter = state["counter"]


@dataclass
class FaultConfig(MethodConfig):
    nan_at: list[int] = field(default_factory=list)  # updates (1-based) whose forward returns NaN logits
    signal_at: int = 0  # after this update, send SIGUSR1 to this process (pre-emption)
    signal_name: str = "SIGUSR1"  # or SIGUSR2 (submitit's notice), SIGTERM


@register_method("test_fault")
class Fault(Method):
    """Full-rank training with injected faults."""

    Config = FaultConfig

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.update = 1

    def prepare_model(self, model):
        def poison(module, _inputs, out):
            return out * float("nan") if module.training and self.update in self.cfg.nan_at else out

        model.register_forward_hook(poison)
        return model

    def after_step(self, ctx: StepContext):
        self.update = ctx.step + 1
        if ctx.step == self.cfg.signal_at:
            os.kill(os.getpid(), getattr(signal, getattr(self.cfg, "signal_name", "SIGUSR1")))

    def state_dict(self):
        return {"update": self.update}

    def load_state_dict(self, state):
        self.update = state["update"]


@dataclass
class GradFaultConfig(MethodConfig):
    grad_nan_at: list[int] = field(default_factory=list)  # updates (1-based) whose q_proj gradient of block 0 is NaN
    signal_at: int = 0  # after this update, send SIGUSR1 to this process (pre-emption)


@register_method("test_grad_fault")
class GradFault(Fault):
    """Full-rank training whose loss stays finite while one gradient turns NaN (a backward overflow)."""

    Config = GradFaultConfig

    def prepare_model(self, model):
        def poison(grad):
            return grad * float("nan") if self.update in self.cfg.grad_nan_at else grad

        model.layers[0].attn.q_proj.weight.register_hook(poison)
        return model


@register_method("test_recompute")
class OwnRecompute(Method):
    """Full-rank training with its own recompute policy: checkpoint every block, counting the calls."""

    calls: ClassVar[list[str]] = []

    def recompute_policy(self):
        import torch

        from lrpretrain.train.recompute import checkpoint_block

        def run(block, *args):
            if torch.is_grad_enabled():  # training forwards (evaluation runs the blocks plainly)
                self.calls.append("checkpoint")
            return checkpoint_block(block, *args)

        def apply(model):
            self.calls.append("apply")
            for block in model.layers:
                block.checkpoint_fn = run

        return apply


@register_method("test_sgd")
class PlainSGD(Method):
    """A third-party-style plugin whose optimizer is a plain torch optimizer (no step_param)."""

    def build_optimizer(self, groups, optim_cfg):
        import torch

        return torch.optim.SGD(groups, lr=optim_cfg.lr)


@dataclass
class NanForwardConfig(MethodConfig):
    nan_at: list[int] = field(default_factory=list)  # updates (1-based) whose forward returns NaN logits


@register_method("test_nan_forward")
class NanForward(Method):
    """Full-rank training with NaN logits at the given updates. It has no ``after_step`` (it learns the
    update from ``lr_factor``), so engines that refuse after_step hooks (DeepSpeed's ZeRO) accept it."""

    Config = NanForwardConfig

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.update = 0

    def prepare_model(self, model):
        def poison(module, _inputs, out):
            return out * float("nan") if module.training and self.update in self.cfg.nan_at else out

        model.register_forward_hook(poison)
        return model

    def lr_factor(self, step):
        self.update = step + 1  # called once per update, before its forward
        return 1.0
