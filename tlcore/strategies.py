"""Transfer strategies: each owns which parameters train, their learning-rate groups and its loss.

Modelled on TLlib's ``Classifier.get_parameters()`` and fastai's ``fine_tune``. A strategy
prepares a :class:`TransferNet` (the model plus any extra modules such as a domain
discriminator, and the outputs they add to ``forward``), declares the data streams it trains on
(:class:`Streams`), and computes the loss of one step from a :class:`Batch`. The engine stays generic:
a new method is one class (and, when it adds modules, one :class:`TransferNet` subclass) in one file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import losses
from .layers import DomainDiscriminator, dann_lambda, grad_reverse
from .models import TransferModel

#: the data streams a training step can draw from, in the order the engine draws them (:class:`Batch`'s fields)
STREAMS = ("source", "target", "unlabeled")


@dataclass
class Batch:
    """One training step's data; a stream a strategy does not use is ``None``."""

    target: tuple[torch.Tensor, torch.Tensor] | None = None  # labeled target (x, y)
    source: tuple[torch.Tensor, torch.Tensor] | None = None  # labeled source (x, y)
    unlabeled: torch.Tensor | None = None  # unlabeled target images


class StreamsError(ValueError):
    """The data given cannot train a strategy; ``missing`` names the streams it lacks."""

    def __init__(self, message: str, missing: tuple[str, ...]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Streams:
    """The data streams a strategy trains on: every ``required`` one, and each ``optional`` one when given.

    Names are :data:`STREAMS` (``source``: labeled source, ``target``: labeled target, ``unlabeled``: the
    target pool without labels). With no required stream, at least one optional stream must be given.
    """

    required: frozenset[str] = frozenset({"target"})
    optional: frozenset[str] = frozenset()

    def __post_init__(self):
        req, opt = frozenset(self.required), frozenset(self.optional)
        object.__setattr__(self, "required", req)
        object.__setattr__(self, "optional", opt)
        unknown = sorted((req | opt) - set(STREAMS))
        if unknown:
            raise ValueError(f"unknown data streams {unknown}; streams are {', '.join(STREAMS)}")
        if req & opt:
            raise ValueError(f"streams {sorted(req & opt)} are both required and optional")
        if not (req or opt):
            raise ValueError("a strategy must train on at least one data stream")

    @property
    def used(self) -> frozenset[str]:
        """Every stream the strategy can train on (required or optional)."""
        return self.required | self.optional

    def check(self, available: Iterable[str], who: str = "this strategy") -> tuple[str, ...]:
        """The streams to train on, given the ``available`` ones (in :data:`STREAMS` order); raises
        :class:`StreamsError` when a required stream is missing, or none is there at all."""
        have = set(available)
        missing = tuple(s for s in STREAMS if s in self.required and s not in have)
        chosen = tuple(s for s in STREAMS if s in self.used and s in have)
        if missing:
            raise StreamsError(f"{who} needs data streams {sorted(self.required)}; missing: {list(missing)}", missing)
        if not chosen:
            raise StreamsError(
                f"{who} needs at least one of the data streams {sorted(self.optional)}; none was given",
                tuple(sorted(self.optional)),
            )
        return chosen


class TransferNet(nn.Module):
    """The model being trained plus a strategy's extra modules; one ``forward`` for DDP.

    ``forward(x, **kw)`` returns a dict with ``features`` ``(N, D)``, ``logits`` ``(N, C)`` and what
    :meth:`extra_outputs` adds from the keyword arguments, all fp32. A strategy with extra modules
    subclasses this and overrides :meth:`extra_outputs` (see :class:`DomainAdversarialNet`).
    """

    def __init__(self, model: TransferModel, extras: dict[str, nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(extras or {})

    def forward(self, x: torch.Tensor, **kw):
        f = self.model.backbone(x)
        out = {"features": f, "logits": self.model.head(f), **self.extra_outputs(f, **kw)}
        # losses run in fp32 even when the forward ran under bf16 autocast
        return {k: v.float() for k, v in out.items()}

    def extra_outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the extra modules on ``features``; keyword arguments of ``forward`` arrive here."""
        return {}

    @staticmethod
    def model_state(net_state: dict) -> dict:
        """The :class:`TransferModel`'s own ``state_dict`` inside a ``TransferNet`` state (extras dropped)."""
        return {k[len("model.") :]: v for k, v in net_state.items() if k.startswith("model.")}


class SourceHeadNet(TransferNet):
    """``forward(x, source_head=True)`` adds ``source_logits`` from ``extras.source_head`` (``(N, C_source)``)."""

    def extra_outputs(self, features, source_head: bool = False):
        return {"source_logits": self.extras["source_head"](features)} if source_head else {}


class DomainAdversarialNet(TransferNet):
    """``forward(x, domain_coeff=c)`` adds ``domain``: ``extras.discriminator`` logits ``(N, 1)`` on features
    whose gradient is reversed and scaled by ``c``."""

    def extra_outputs(self, features, domain_coeff: float | None = None):
        if domain_coeff is None:
            return {}
        return {"domain": self.extras["discriminator"](grad_reverse(features, domain_coeff))}


_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls):
    if cls.name in _STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is already registered")
    _STRATEGIES[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def strategy_class(name: str) -> type[Strategy]:
    """The registered class (its ``streams`` and ``transfers`` say what data and init it needs)."""
    if name not in _STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; choose one of: {', '.join(list_strategies())}")
    return _STRATEGIES[name]


def create_strategy(name: str, **hparams: Any) -> Strategy:
    return strategy_class(name)(**hparams)


def _unwrap(net: nn.Module) -> TransferNet:
    return getattr(net, "module", net)


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Strategy:
    """Base class. Subclasses set ``name``, ``streams`` (and ``net_type`` when they add modules) and override
    the hooks they need."""

    name: ClassVar[str] = ""
    #: the data it trains on; the engine, the training stages and the planner all read this one declaration
    streams: ClassVar[Streams] = Streams(required={"target"})
    #: the net :meth:`setup` builds (a subclass adds the outputs of the strategy's extra modules)
    net_type: ClassVar[type[TransferNet]] = TransferNet
    #: whether the model starts from the source weights (False only for ``scratch``)
    transfers: ClassVar[bool] = True
    #: whether source and target must share one label set (the source classifier is adapted, not replaced)
    shared_label_set: ClassVar[bool] = False

    def __init__(self, backbone_lr_mult: float = 1.0, reset_head: bool | None = None, label_smoothing: float = 0.0):
        self.backbone_lr_mult = backbone_lr_mult
        self.reset_head = reset_head
        self.label_smoothing = label_smoothing

    # -- setup -------------------------------------------------------------------------------
    def setup(self, model: TransferModel, num_classes: int, same_label_space: bool = True) -> TransferNet:
        """Prepare ``model`` for the target task; returns the net the engine trains."""
        reset = self.reset_head if self.reset_head is not None else not same_label_space
        if reset or model.num_classes != num_classes:
            model.reset_head(num_classes)
        _set_trainable(model, True)
        return self.net_type(model, self.extras(model))

    def extras(self, model: TransferModel) -> dict[str, nn.Module]:
        return {}

    def param_groups(self, net: TransferNet, base_lr: float) -> list[dict]:
        """Optimiser parameter groups, each ``{"name", "params", "lr"}``."""
        net = _unwrap(net)
        groups = [
            {
                "name": "backbone",
                "params": list(net.model.backbone.parameters()),
                "lr": base_lr * self.backbone_lr_mult,
            },
            {"name": "head", "params": list(net.model.head.parameters()), "lr": base_lr},
        ]
        if len(net.extras):
            groups.append({"name": "extras", "params": list(net.extras.parameters()), "lr": base_lr})
        return groups

    def on_epoch_start(self, net: nn.Module, epoch: int) -> None:
        """Called before each epoch (0-based); strategies that unfreeze do it here."""

    def train_mode(self, net: nn.Module) -> None:
        """Put ``net`` in training mode; frozen parts keep BatchNorm statistics fixed."""
        net.train()

    # -- loss --------------------------------------------------------------------------------
    def loss(
        self, net: nn.Module, batch: Batch, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """``(loss, logs)``: the scalar to minimise and named values to average over the epoch, as detached
        0-d tensors (or floats): the engine reads them from the device once per epoch, not per step."""
        x, y = batch.target
        out = net(x)
        loss = losses.cross_entropy(out["logits"], y, self.label_smoothing)
        return loss, {"loss_target": loss.detach()}

    def _target_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return losses.cross_entropy(logits, y, self.label_smoothing)


@register_strategy
class Scratch(Strategy):
    """No transfer: every weight re-initialised, trained on the labeled target only (the baseline)."""

    name = "scratch"
    transfers = False

    def setup(self, model, num_classes, same_label_space=True):
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        model.reset_head(num_classes)
        _set_trainable(model, True)
        return self.net_type(model)


@register_strategy
class LinearProbe(Strategy):
    """Feature-based transfer: frozen backbone (weights and BatchNorm statistics), new head."""

    name = "linear_probe"

    def setup(self, model, num_classes, same_label_space=True):
        net = super().setup(model, num_classes, same_label_space)
        _set_trainable(model.backbone, False)
        return net

    def param_groups(self, net, base_lr):
        return [{"name": "head", "params": list(_unwrap(net).model.head.parameters()), "lr": base_lr}]

    def train_mode(self, net):
        net.train()
        _unwrap(net).model.backbone.eval()


@register_strategy
class FineTune(Strategy):
    """Model-based transfer: all layers train; the backbone at ``backbone_lr_mult`` x the head's rate."""

    name = "finetune"

    def __init__(self, backbone_lr_mult: float = 0.1, **kw):
        super().__init__(backbone_lr_mult=backbone_lr_mult, **kw)


@register_strategy
class GradualUnfreeze(Strategy):
    """Head only for ``freeze_epochs``, then every layer with discriminative learning rates.

    Backbone stage ``i`` of ``n`` (input side first) gets ``lr * lr_decay ** (n - i)``, as in
    ULMFiT/fastai ``fine_tune`` and Lightning's ``BackboneFinetuning``.
    """

    name = "gradual_unfreeze"

    def __init__(self, freeze_epochs: int = 1, lr_decay: float = 0.5, **kw):
        super().__init__(**kw)
        self.freeze_epochs = freeze_epochs
        self.lr_decay = lr_decay
        self.frozen = True

    @staticmethod
    def stages(model: TransferModel) -> list[nn.Module]:
        return [m for m in model.backbone.children() if any(True for _ in m.parameters())]

    def setup(self, model, num_classes, same_label_space=True):
        net = super().setup(model, num_classes, same_label_space)
        self.frozen = self.freeze_epochs > 0
        _set_trainable(model.backbone, not self.frozen)
        return net

    def param_groups(self, net, base_lr):
        model = _unwrap(net).model
        st = self.stages(model)
        groups = [
            {"name": f"backbone.{i}", "params": list(m.parameters()), "lr": base_lr * self.lr_decay ** (len(st) - i)}
            for i, m in enumerate(st)
        ]
        return groups + [{"name": "head", "params": list(model.head.parameters()), "lr": base_lr}]

    def on_epoch_start(self, net, epoch):
        self.frozen = epoch < self.freeze_epochs
        _set_trainable(_unwrap(net).model.backbone, not self.frozen)

    def train_mode(self, net):
        net.train()
        if self.frozen:
            _unwrap(net).model.backbone.eval()


@register_strategy
class Joint(Strategy):
    """Optimisation-based transfer: ``L = L_S + lam * L_T`` on paired source/target batches.

    When the label sets differ, the source keeps its own head (``extras.source_head``) and the
    target gets a new one; with the same label set one head serves both.
    """

    name = "joint"
    streams = Streams(required={"source", "target"})
    net_type = SourceHeadNet

    def __init__(self, lam: float = 1.0, **kw):
        super().__init__(**kw)
        self.lam = lam
        self.separate_heads = False

    def setup(self, model, num_classes, same_label_space=True):
        self.separate_heads = not same_label_space
        source_head = copy.deepcopy(model.head) if self.separate_heads else None
        net = super().setup(model, num_classes, same_label_space)
        if source_head is not None:
            net.extras["source_head"] = source_head
        return net

    def loss(self, net, batch, progress):
        (xs, ys), (xt, yt) = batch.source, batch.target
        out = net(torch.cat([xs, xt]), source_head=self.separate_heads)
        ns = xs.shape[0]
        src_logits = (out["source_logits"] if self.separate_heads else out["logits"])[:ns]
        ls = losses.cross_entropy(src_logits, ys)
        lt = self._target_ce(out["logits"][ns:], yt)
        return losses.joint_loss(ls, lt, self.lam), {"loss_source": ls.detach(), "loss_target": lt.detach()}


class _SourceSupervised(Strategy):
    """Shared setup for adaptation methods that train on labeled source + unlabeled target images, plus the
    labeled target when the label budget has any."""

    shared_label_set = True
    streams = Streams(required={"source", "unlabeled"}, optional={"target"})

    def _forward(self, net, batch: Batch, **kw) -> tuple[dict, int, int]:
        """One forward over ``[source, unlabeled, labeled target]`` (one pass keeps DDP and BN simple)."""
        (xs, _), xu = batch.source, batch.unlabeled
        parts = [xs, xu] + ([batch.target[0]] if batch.target is not None else [])
        return net(torch.cat(parts), **kw), xs.shape[0], xu.shape[0]

    def _add_target(self, out: dict, batch: Batch, end: int, loss: torch.Tensor, logs: dict):
        """Add the labeled-target cross-entropy when the step has labeled target images."""
        if batch.target is None:
            return loss, logs
        lt = self._target_ce(out["logits"][end:], batch.target[1])
        return loss + lt, {**logs, "loss_target": lt.detach()}

    def setup(self, model, num_classes, same_label_space=True):
        if not same_label_space or model.num_classes != num_classes:
            raise ValueError(
                f"strategy {self.name!r} adapts a source classifier to the target, so source and target "
                f"must share one label set; they differ here. Use 'joint', 'finetune' or 'linear_probe' instead."
            )
        return super().setup(model, num_classes, same_label_space=True)


@register_strategy
class DANN(_SourceSupervised):
    """Domain-adversarial training (Ganin et al., JMLR 2016) with unlabeled target images.

    ``L = CE(source) + trade_off * L_adv`` where the discriminator sees gradient-reversed
    features and the reversal coefficient follows ``2/(1+exp(-10 p)) - 1``. With a label budget,
    labeled target batches add a supervised term (semi-supervised DANN); with none it is pure UDA.
    """

    name = "dann"
    net_type = DomainAdversarialNet

    def __init__(self, trade_off: float = 1.0, hidden: int = 256, **kw):
        super().__init__(**kw)
        self.trade_off = trade_off
        self.hidden = hidden

    def extras(self, model):
        return {"discriminator": DomainDiscriminator(model.out_features, self.hidden)}

    def loss(self, net, batch, progress):
        coeff = dann_lambda(progress)
        out, ns, nu = self._forward(net, batch, domain_coeff=coeff)
        ls = losses.cross_entropy(out["logits"][:ns], batch.source[1])
        d_s, d_t = out["domain"][:ns], out["domain"][ns : ns + nu]
        adv = losses.domain_adversarial_loss(d_s, d_t)
        with torch.no_grad():
            dom_acc = ((d_s > 0).float().mean() + (d_t <= 0).float().mean()) / 2
        loss, logs = (
            ls + self.trade_off * adv,
            {"loss_source": ls.detach(), "loss_adv": adv.detach(), "domain_acc": dom_acc.detach(), "grl_coeff": coeff},
        )
        return self._add_target(out, batch, ns + nu, loss, logs)


@register_strategy
class MCC(_SourceSupervised):
    """Minimum Class Confusion (Jin et al., ECCV 2020): ``CE(source) + trade_off * MCC(target)``.

    A strong, discriminator-free unsupervised domain-adaptation method on digit benchmarks.
    Labeled target batches, when the budget has any, add a supervised term.
    """

    name = "mcc"

    def __init__(self, trade_off: float = 1.0, temperature: float = 2.5, **kw):
        super().__init__(**kw)
        self.trade_off = trade_off
        self.temperature = temperature

    def loss(self, net, batch, progress):
        out, ns, nu = self._forward(net, batch)
        ls = losses.cross_entropy(out["logits"][:ns], batch.source[1])
        lm = losses.mcc_loss(losses.global_batch(out["logits"][ns : ns + nu]), self.temperature)  # every rank's
        logs = {"loss_source": ls.detach(), "loss_mcc": lm.detach()}
        return self._add_target(out, batch, ns + nu, ls + self.trade_off * lm, logs)


@register_strategy
class SemiSupervised(_SourceSupervised):
    """Semi-supervised adaptation: labeled source + the few labeled target + the unlabeled pool.

    ``L = source_weight * CE(source) + CE(target) + trade_off * MCC(unlabeled)
    + pseudo_weight * CE(unlabeled, confident pseudo-labels)`` (MCC plus self-training with a
    confidence threshold, as in FixMatch's pseudo-labelling without strong augmentation).
    """

    name = "semi"

    def __init__(
        self,
        trade_off: float = 1.0,
        temperature: float = 2.5,
        source_weight: float = 1.0,
        pseudo_weight: float = 1.0,
        threshold: float = 0.95,
        **kw,
    ):
        super().__init__(**kw)
        self.trade_off, self.temperature = trade_off, temperature
        self.source_weight, self.pseudo_weight, self.threshold = source_weight, pseudo_weight, threshold

    def loss(self, net, batch, progress):
        out, ns, nu = self._forward(net, batch)
        logits_u = out["logits"][ns : ns + nu]
        ls = losses.cross_entropy(out["logits"][:ns], batch.source[1])
        lm = losses.mcc_loss(losses.global_batch(logits_u), self.temperature)  # on every rank's unlabeled batch
        probs = torch.softmax(logits_u.detach(), dim=1)
        conf, pseudo = probs.max(dim=1)
        mask = (conf >= self.threshold).float()
        lp = (torch.nn.functional.cross_entropy(logits_u, pseudo, reduction="none") * mask).mean()
        loss = self.source_weight * ls + self.trade_off * lm + self.pseudo_weight * lp
        logs = {"loss_source": ls.detach(), "loss_mcc": lm.detach(), "pseudo_frac": mask.mean().detach()}
        return self._add_target(out, batch, ns + nu, loss, logs)
