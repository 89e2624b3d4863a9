"""Mask kinds: how a sparse layer's mask state maps to the gate g in w_eff = w ⊙ g.

A mask kind is a plain object held by a layer as ``layer.mask``. It registers its
tensors on the layer itself (so they appear in the layer's state_dict beside ``weight``
as ``weight_mask`` / ``weight_score`` / ``weight_log_alpha``), tells the op layer which
tensor and constants to use, and knows the pure-torch gate, the support and the density
used by report() and export(). The forward/backward math lives in sparsekern.ops; the
pure-torch gates here are only for exporting and reporting (no autograd needed there).

| kind             | state on the layer              | eval gate g                          |
|------------------|---------------------------------|--------------------------------------|
| binary           | weight_mask (bool buffer)       | m                                    |
| straight_through | weight_mask (bool buffer)       | m   (backward: grad_w = G, unmasked) |
| sigmoid          | weight_score (parameter s)      | scale·σ(β·s), scale = 1/σ(s0)        |
| relaxed          | weight_mask (parameter m∈[0,1]) | m                                    |
| hard_concrete    | weight_log_alpha (parameter)    | median gate clamp(σ(logα/β)(ζ−γ)+γ)  |
"""
from __future__ import annotations

import abc
import inspect
import math
import numbers
import weakref

import torch
from torch import nn

from .. import _checks, ops
from ..ops import hard_concrete, hard_concrete_masked, mask_apply, mask_math

# Hard-concrete stretch constants (Louizos et al. 2018), shared with the op defaults.
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
# log α is clamped to [ln 0.01, ln 100] after each step (Gallego-Posada et al.'s code).
HC_LOG_ALPHA_RANGE = (math.log(0.01), math.log(100.0))


def _real(name: str, value, **bounds) -> float:
    return _checks.real(f"mask option `{name}`", value, **bounds)


def _bool(name: str, value) -> bool:
    return _checks.boolean(f"mask option `{name}`", value)


class MaskKind(abc.ABC):
    """Base of every mask kind. Subclasses set `name` and `state_names` and implement
    `attach`, `op_mask` and `gate`; the rest has a default that follows from those."""

    name: str = ""
    state_names: tuple[str, ...] = ()

    @abc.abstractmethod
    def attach(self, layer: nn.Module) -> None:
        """Registers this kind's tensors on `layer`, shaped for `layer.weight`."""

    @abc.abstractmethod
    def op_mask(self, layer: nn.Module) -> tuple[torch.Tensor, dict]:
        """(mask argument, keyword arguments) for ops.masked_linear / masked_conv2d_weight."""

    @abc.abstractmethod
    def gate(self, layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The deterministic (eval-mode) gate g, broadcastable to the weight, in `dtype`
        (None: the weight's); pure torch, for export and report. Computed in float32 at
        least, as the masked ops compute it: in float16, 1/σ(s0) overflowed for s0 < −11
        and σ underflowed, and a model whose gates were all 1 exported all-zero weights."""

    def bias_gated(self, layer: nn.Module) -> bool:
        """Whether the bias is multiplied by the same gate as its output channel."""
        return False

    def gates_output_channels(self, layer: nn.Module) -> bool:
        """Whether every forward of `layer` passes or zeroes each output channel as a whole
        (weights and bias), so a BatchNorm right after it can run on the open channels
        alone (sparsekern.nn.batchnorm); channel_gates then says which."""
        return False

    def channel_gates(self, layer: nn.Module) -> torch.Tensor:
        """The gate `layer`'s current forward multiplies each output channel by (0: closed),
        an [out_channels] tensor; only where gates_output_channels(layer)."""
        raise TypeError(f"mask kind {self.name!r} does not gate whole output channels")

    def eval_channel_gates(self, layer: nn.Module) -> torch.Tensor:
        """channel_gates(layer) of an eval-mode forward, whatever the layer's mode: what
        export bakes (only where gates_output_channels(layer))."""
        raise TypeError(f"mask kind {self.name!r} does not gate whole output channels")

    # Set on a layer's mask once a BatchNorm after it is gated by it (sparsekern.nn.batchnorm).
    batchnorm_gated: bool = False

    def after_apply(self, layer: nn.Module) -> None:
        """Called after the layer's Module._apply (to(), half(), cuda(), to_empty(), ...)
        converted every float tensor on it: puts right what that blanket conversion gets
        wrong for this kind's own tensors. Drops the kept penalty term: Module._apply swaps
        a parameter's data without bumping its version, so ForwardTerm.current took the
        old dtype's term for current, and a penalty() right after model.to(bfloat16) had
        a float32 graph whose backward raised (mask_apply: `weight` must be float32)."""
        self._forward_term = None

    def masked_weight(self, layer: nn.Module) -> torch.Tensor | None:
        """w ⊙ g computed by the kind itself in one fused op that also yields its penalty
        term (unstructured hard-concrete: sampling z with the expected L0; sigmoid and
        relaxed, eager CPU: the gate's L1 norm); None: the layer calls the masked op with
        op_mask(). Never for a bias-gated layer."""
        return None

    def keep(self, layer: nn.Module) -> torch.Tensor:
        """The support as a bool tensor of the weight's shape: which weights the mask keeps."""
        return (self.gate(layer) != 0).expand(layer.weight.shape)

    def density(self, layer: nn.Module) -> float:
        """Fraction of the weights the mask keeps."""
        return float(self.keep(layer).float().mean()) if layer.weight.numel() else 1.0

    def mask_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The learnable mask tensors (for their own optimiser group); [] when fixed."""
        return [t for n in self.state_names if isinstance(t := getattr(layer, n), nn.Parameter)]

    @torch.no_grad()
    def project(self, layer: nn.Module) -> None:
        """Projects the learnable mask back to its domain, its clamp_box when it has one;
        call after optimizer.step()."""
        if self.clamp_box is not None:
            name, low, high = self.clamp_box
            getattr(layer, name).clamp_(low, high)

    # The mask parameter's domain when it is a box: (state name, low, high). project()
    # clamps to it, and project_layers clamps all layers of the kind in two foreach calls.
    # A subclass whose project() does anything else must set it to None.
    clamp_box: tuple[str, float, float] | None = None

    def options(self) -> dict:
        """The constructor options (shown in the layer's repr)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    # The penalty term of the layer's last forward (ForwardTerm), for kinds whose forward
    # op computes it in the same pass as the masked weight.
    _forward_term: "ForwardTerm | None" = None

    def __getstate__(self):
        # The kept term is a graph tensor (copy.deepcopy refuses those, and
        # sparsekern.export deep-copies the model): copies and pickles start without it.
        state = self.__dict__.copy()
        state.pop("_forward_term", None)
        return state

    def _masked_weight_l1(self, layer: nn.Module, mask: torch.Tensor, param: torch.Tensor, key,
                          beta: float = 1.0, scale: float = 1.0) -> torch.Tensor | None:
        """Eager CPU: w ⊙ g and Σ g from one op (mask_apply.masked_weight_l1), Σ g kept as
        the ForwardTerm of `param` under `key`; None elsewhere (the layer calls the masked op)."""
        out = mask_apply.masked_weight_l1(layer.weight, mask, self.name, beta, scale)
        if out is None:
            return None
        self._forward_term = ForwardTerm(param, out[1], key)
        return out[0]

    def _current_term(self, param: torch.Tensor, key=None) -> torch.Tensor | None:
        term = self._forward_term
        return None if term is None else term.current(param, key)


class ForwardTerm:
    """A penalty term (the expected L0, the gate's L1 norm) that a layer's forward computed
    in the same pass as its masked weight, kept so the penalty reuses it: its gradient then
    joins the mask's in the forward op's one backward pass, and the mask is not read again.

    current() returns it while it still stands for the mask parameter `param`: the same
    tensor, not modified since (an optimiser step or a clamp bumps its version), the same
    `key` (the constants it was computed with), and, when a gradient is wanted, its graph
    there and not yet used by a backward (one through the masked weight writes param's
    .grad, so .grad must be the same tensor at the same version). Otherwise None: compute
    it afresh. A backward that writes no .grad (torch.autograd.grad w.r.t. param) goes
    unnoticed: a penalty used after it reaches into the used graph, and its backward raises.

    Under torch.compile, reading .grad makes dynamo guard on it being None: a loop that
    zeroes gradients between forward and backward compiles the forward a second time, once,
    when .grad first exists at forward time. Kept: not keeping the term under compile (the
    penalty recomputing it) cost 1.4-2.4 ms on every compiled ResNet-20 L0 step (+2.5-3.7%,
    2 cores), the second compile 1.3-1.6 s once (its kernels are the first one's)."""

    __slots__ = ("param", "version", "grad_ref", "grad_version", "key", "value")

    def __init__(self, param: torch.Tensor, value: torch.Tensor, key=None):
        grad = param.grad
        # An inference tensor (a model copied or built under torch.inference_mode) has no
        # version counter (reading it raised): never current then. Not asked under
        # torch.compile, which cannot trace is_inference() (and compiles no such tensor).
        inference = not torch.compiler.is_compiling() and param.is_inference()
        version = None if inference else param._version
        self.param, self.version, self.key, self.value = param, version, key, value
        # .grad held weakly: a strong reference would keep the previous step's gradient
        # alive through the next backward after optimizer.zero_grad(set_to_none=True).
        self.grad_ref = None if grad is None else weakref.ref(grad)
        self.grad_version = None if grad is None else grad._version

    def current(self, param: torch.Tensor, key=None) -> torch.Tensor | None:
        if self.param is not param or self.version is None or param._version != self.version:
            return None
        if not (self.key is key or (isinstance(key, tuple) and self.key == key)):
            return None
        if not (torch.is_grad_enabled() and param.requires_grad):
            return self.value.detach()
        if not self.value.requires_grad:  # the forward ran without a graph
            return None
        now = param.grad
        if self.grad_ref is None:
            unchanged = now is None
        else:
            unchanged = now is not None and self.grad_ref() is now and now._version == self.grad_version
        return self.value if unchanged else None


# Above this many values a tensor is clamped alone, in one pass; below, with the kind's
# other small tensors in two foreach passes (clamp_min_, clamp_max_: there is no foreach
# clamp with both bounds). A second pass over 64K float32 values costs about one op's
# dispatch (~4 us) here. ResNet-18's 21 log α tensors (11.2M values): foreach pair 1.7-2.0
# ms, one clamp_ each 0.93-0.97 ms (median of 15, three runs).
CLAMP_ALONE_NUMEL = 1 << 16


@torch.no_grad()
def project_layers(layers) -> None:
    """layer.mask.project(layer) for every layer; the layers whose mask kind has a
    clamp_box are clamped per kind with two foreach calls over the small tensors instead
    of one op per layer (ResNet-20's 22 layers: 22 clamp_ calls, ~4 us each), and one
    clamp_ each for the large ones (CLAMP_ALONE_NUMEL)."""
    boxes: dict[tuple, list[torch.Tensor]] = {}
    for layer in layers:
        mask = layer.mask
        box = type(mask).clamp_box
        if box is None:
            mask.project(layer)
            continue
        tensor = getattr(layer, box[0])
        if tensor.numel() >= CLAMP_ALONE_NUMEL:
            tensor.clamp_(box[1], box[2])
        else:
            boxes.setdefault(box, []).append(tensor)
    for (_, low, high), tensors in boxes.items():
        torch._foreach_clamp_min_(tensors, low)
        torch._foreach_clamp_max_(tensors, high)


class BinaryMask(MaskKind):
    """Fixed 0/1 mask m (bool buffer, all True at init); grad_w = G ⊙ m, so pruned weights
    never move (IMP, one-shot, GMP)."""

    name = "binary"
    state_names = ("weight_mask",)

    def attach(self, layer):
        w = layer.weight
        layer.register_buffer("weight_mask", torch.ones(w.shape, dtype=torch.bool, device=w.device))

    def op_mask(self, layer):
        return layer.weight_mask, {"kind": self.name}

    def masked_weight(self, layer):
        """Eager CPU with every pruned weight exactly zero (the methods keep them so): the
        weight itself, its gradient masked, so the layer saves no w_eff
        (ops.mask_apply.binary_weight)."""
        return mask_apply.binary_weight(layer.weight, layer.weight_mask)

    def gate(self, layer, dtype=None):
        return layer.weight_mask.to(dtype or layer.weight.dtype)

    def keep(self, layer):
        return layer.weight_mask.clone()


class StraightThroughMask(BinaryMask):
    """Like binary in the forward; the backward passes G to every weight unmasked, so pruned
    weights keep learning and can come back (DPF).

    whole_channels=True (DPF's structured mode) declares that the mask keeps or prunes a
    conv's output channels whole: a BatchNorm2d right after such a conv is then gated by
    it (sparsekern.nn.batchnorm), its affine parameters masked with the channel, straight
    through as the weights are. A channel whose weights are all pruned is closed."""

    name = "straight_through"
    whole_channels = False  # a class default: masks pickled before the option read False

    def __init__(self, *, whole_channels: bool = False):
        self.whole_channels = _bool("whole_channels", whole_channels)

    def masked_weight(self, layer):
        return None  # the pruned weights keep training: they are not zero

    def gates_output_channels(self, layer):
        return self.whole_channels and layer.weight.dim() == 4

    def channel_gates(self, layer):
        """1 for a channel with some weight kept, 0 for one pruned whole; no gradient (the
        BatchNorm passes its affine parameters' straight through). Kept until the mask
        changes (DPF recomputes it every `period` steps): the any() over a ResNet-20
        stage-3 mask took 28 us, a third of what the gated BatchNorm added to its step."""
        if not self.gates_output_channels(layer):
            return super().channel_gates(layer)
        mask, dtype = layer.weight_mask, layer.weight.dtype
        if torch.compiler.is_compiling():  # dynamo cannot guard on a version counter
            return mask.flatten(1).any(1).to(dtype)
        kept = self.__dict__.get("_channel_gates")
        if kept is not None and kept[0] is mask and kept[1] == mask._version and kept[2].dtype == dtype:
            return kept[2]
        gates = mask.flatten(1).any(1).to(dtype)
        self._channel_gates = (mask, mask._version, gates)
        return gates

    def eval_channel_gates(self, layer):
        return self.channel_gates(layer)  # the same in both modes

    def options(self):
        return {"whole_channels": True} if self.whole_channels else {}

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_channel_gates", None)  # a cache (and a reference to the old mask tensor)
        return state

    def after_apply(self, layer):
        super().after_apply(layer)
        self.__dict__.pop("_channel_gates", None)


# The lowest initial score: 1/σ(s0) (the gate's scale) stays finite in float32 (e^80 ≈
# 5.5e34 < 3.4e38) and σ(s0) a normal float32 (σ(−80) ≈ 1.8e−35 > 1.2e−38). At s0 = −1000
# the scale overflowed (OverflowError in the first forward); at −inf every gate was 0.
S0_MIN = -80.0


class SigmoidMask(MaskKind):
    """Continuous Sparsification: learnable score s (init s0), g = scale·σ(β·s) with
    scale = 1/σ(s0) when scale_init (so g = 1 at init) and 1 otherwise. β is a plain
    attribute the method anneals. The support (CS's final ticket) is s > 0."""

    name = "sigmoid"
    state_names = ("weight_score",)

    SUPPORTS = ("positive", "nonzero")

    def __init__(self, *, s0: float = 0.0, beta: float = 1.0, scale_init: bool = True, support: str = "positive"):
        self.s0 = _real("s0", s0, low=S0_MIN)
        self._beta = _real("beta", beta, low=0.0, low_open=True)
        self.scale_init = _bool("scale_init", scale_init)
        # Which weights count as kept: "positive" s > 0 (CS's ticket rule), or "nonzero"
        # g ≠ 0, the weights the export keeps (the concave method's sigmoid ablation, where
        # a pruned entry has s = −inf).
        self.support = _checks.choice("mask option `support`", support, self.SUPPORTS)

    @property
    def beta(self) -> float:
        """The temperature β; change it with set_beta(layer, β)."""
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        raise AttributeError("set the temperature with layer.mask.set_beta(layer, beta): it also updates "
                             "the layer's `weight_beta` buffer that compiled forwards read")

    def set_beta(self, layer: nn.Module, beta: float) -> None:
        """Sets β: the float the eager forward passes to the op, and the layer's 0-dim
        buffer `weight_beta` (not in the state_dict) that a torch.compile'd forward reads
        instead, so annealing β does not recompile (a float read off the module is a
        guarded constant: each new β was a new graph, eager after 8)."""
        self._beta = _real("beta", beta, low=0.0, low_open=True)
        layer.weight_beta.fill_(self._beta)

    @staticmethod
    def _beta_dtype(layer: nn.Module) -> torch.dtype:
        # The dtype the op computes β·s in (float32 at least, float64 for float64 models):
        # β held in it is the very number the eager forward multiplies by.
        return mask_math.compute_dtype(layer.weight_score, layer.weight.dtype)

    def after_apply(self, layer):
        """Keeps `weight_beta` in the gate's compute dtype and equal to β. model.to(bfloat16)
        or .half() converted it with the weights: β = 14.142 became 14.125 in compiled
        forwards while the eager ones used the float (outputs up to 4e-3 apart), and
        to_empty() left it uninitialised (it is not in the state_dict, so nothing loads it)."""
        super().after_apply(layer)
        buffer = layer._buffers.get("weight_beta")
        if buffer is None:
            return
        dtype = self._beta_dtype(layer)
        if buffer.dtype != dtype:
            buffer = torch.empty((), dtype=dtype, device=buffer.device)
        # In place when it kept its dtype: a buffer _apply shared (share_memory_) stays shared.
        layer._buffers["weight_beta"] = buffer.fill_(self._beta)

    @property
    def scale(self) -> float:
        # Fixed by s0, not by β: the code divides by σ(s0) whatever the current temperature.
        return 1.0 + math.exp(-self.s0) if self.scale_init else 1.0  # 1/σ(s0)

    def attach(self, layer):
        w = layer.weight
        layer.weight_score = nn.Parameter(torch.full_like(w, self.s0, requires_grad=True))
        layer.register_buffer("weight_beta", torch.full((), self._beta, dtype=self._beta_dtype(layer), device=w.device),
                              persistent=False)

    def op_mask(self, layer):
        if torch.compiler.is_compiling():
            # β·s from the buffer, so the graph takes β as an input; the op then runs with β = 1.
            # Formed in the compute dtype, as the eager op forms it: a 16-bit product rounded
            # β·s before the sigmoid (bfloat16 outputs 4e-3 apart from eager's even with β exact).
            dtype = self._beta_dtype(layer)
            scores = layer.weight_beta.to(dtype) * layer.weight_score.to(dtype)
            return scores, {"kind": self.name, "beta": 1.0, "scale": self.scale}
        return layer.weight_score, {"kind": self.name, "beta": self._beta, "scale": self.scale}

    def gate(self, layer, dtype=None):
        s = layer.weight_score.detach()
        s = s.to(mask_math.compute_dtype(s, layer.weight.dtype))
        return (self.scale * torch.sigmoid(self._beta * s)).to(dtype or layer.weight.dtype)

    def masked_weight(self, layer):
        """Eager CPU: w ⊙ g and Σ g from one op (mask_apply.masked_weight_l1); Σ g is kept
        for l1(). None elsewhere: the layer calls the masked op."""
        scores, beta, scale = layer.weight_score, self._beta, self.scale
        return self._masked_weight_l1(layer, scores, scores, (beta, scale), beta, scale)

    def l1(self, layer: nn.Module) -> torch.Tensor:
        """Σ g = Σ scale·σ(β·s), the mask's L1 norm (CS's penalty), differentiable in s:
        the layer's last forward's when it still stands (ForwardTerm), else one fused pass
        (ops.sigmoid_mask_l1), with β taken as op_mask takes it."""
        cached = self._current_term(layer.weight_score, (self._beta, self.scale))
        if cached is not None:
            return cached
        scores, kw = self.op_mask(layer)
        return ops.sigmoid_mask_l1(scores, kw["beta"], kw["scale"])

    def keep(self, layer):
        if self.support == "nonzero":
            return super().keep(layer)
        return layer.weight_score.detach() > 0

    def options(self):
        return {"s0": self.s0, "beta": self._beta, "scale_init": self.scale_init, "support": self.support}


class RelaxedMask(MaskKind):
    """Concave regularisers: learnable m ∈ [0, 1] (init m0), g = m, grad_m = G ⊙ w;
    `project` clamps m back to [0, 1]."""

    name = "relaxed"
    state_names = ("weight_mask",)

    def __init__(self, *, m0: float = 0.5):
        self.m0 = _real("m0", m0, low=0.0, high=1.0)
        # Set True by ConcaveRegularization once the layer has entries pruned for good: those
        # get no gradient (mask_apply.grad_masked), by the layer's bool buffer `weight_alive`
        # (m's shape, False where pruned; the method registers it). Read off the layer at
        # each forward rather than held here: a buffer follows model.to(device) with m
        # (Module._apply), while a tensor held by this object stayed on the old device, and
        # the forward after model.to("cuda") masked a CUDA gradient with a CPU tensor.
        self.has_dead = False

    def __setstate__(self, state):
        # A mask pickled (torch.save(model)) when it held the tensor itself as `grad_keep`.
        state.pop("grad_keep", None)
        state.setdefault("has_dead", False)
        self.__dict__.update(state)

    def attach(self, layer):
        layer.weight_mask = nn.Parameter(torch.full_like(layer.weight, self.m0, requires_grad=True))

    def grad_keep(self, layer: nn.Module) -> torch.Tensor | None:
        """The bool tensor m's gradient is masked by (False: pruned for good), or None: every
        entry learns."""
        return layer.weight_alive if self.has_dead else None

    def op_mask(self, layer):
        m = layer.weight_mask
        keep = self.grad_keep(layer)
        if keep is not None:
            m = mask_apply.grad_masked(m, keep)
        return m, {"kind": self.name}

    def masked_weight(self, layer):
        """Eager CPU: w ⊙ m and Σ m from one op (mask_apply.masked_weight_l1); Σ m is kept
        for l1(). None elsewhere: the layer calls the masked op."""
        return self._masked_weight_l1(layer, self.op_mask(layer)[0], layer.weight_mask, self.grad_keep(layer))

    def l1(self, layer: nn.Module) -> torch.Tensor:
        """Σ m, differentiable in m (dead entries: no gradient): the layer's last forward's
        when it still stands (ForwardTerm), else m.sum()."""
        cached = self._current_term(layer.weight_mask, self.grad_keep(layer))
        if cached is not None:
            return cached
        return self.op_mask(layer)[0].sum()

    def gate(self, layer, dtype=None):
        return layer.weight_mask.detach().to(dtype or layer.weight.dtype)

    clamp_box = ("weight_mask", 0.0, 1.0)

    def options(self):
        return {"m0": self.m0}


class HardConcreteMask(MaskKind):
    """L0 gates (Louizos et al. 2018): one learnable log α per group.

    structured: one gate per conv output channel (the bias is gated with it) or per
    linear input neuron; log α is stored broadcastable to the weight ([out,1,1,1] /
    [1,in]). inputs_per_gate=k (structured Linear only): one gate per k consecutive input
    neurons, log α [1, in/k], the gate repeated k times along the inputs — an attention
    head's inputs to the output projection (SparseMultiheadAttention sets k = head_dim:
    one gate per head, which purge then removes whole). Unstructured: one gate per weight. Init log α ~ N(log((1−p)/p), 0.01²) with
    p = droprate_init. In training each forward samples one z per gate from the Philox
    stream at (seed, offset) and then advances offset by one (the op's counter is
    (flat index, offset), so a new offset is fresh noise for every gate); the backward
    regenerates z from the same (seed, offset). Eval uses the deterministic median gate.
    The op computes the expected L0 in the same pass as z; each forward keeps it for
    expected_nonzero() (the L0 methods' penalty), which uses it while it is current.

    The offset is kept as a one-element int64 tensor on log α's device (`offset` reads
    and sets it as an int) and passed to the ops as that tensor. As a Python int it made
    torch.compile recompile at every training step (dynamo specialises on ints held by a
    module; after 8 recompiles it gave up and ran the model eagerly: 5 compiles in 5
    steps of a small CNN, now 1, python_tests/test_methods_compile.py). Eager cost: one
    `offset + 1` per training forward, 3.7 us on the 2-core machine (0.2% of a ResNet-20
    step under ConstrainedL0).
    """

    name = "hard_concrete"
    state_names = ("weight_log_alpha",)

    def __init__(
        self,
        *,
        structured: bool = False,
        droprate_init: float = 0.5,
        beta: float = HC_BETA,
        gamma: float = HC_GAMMA,
        zeta: float = HC_ZETA,
        seed: int | None = None,
        inputs_per_gate: int = 1,
    ):
        self.structured = _bool("structured", structured)
        self.inputs_per_gate = _checks.integer("mask option `inputs_per_gate`", inputs_per_gate, low=1)
        if self.inputs_per_gate > 1 and not self.structured:
            raise ValueError("mask option `inputs_per_gate` > 1 needs structured=True (it groups a Linear's input gates)")
        self.droprate_init = _real("droprate_init", droprate_init, low=0.0, high=1.0, low_open=True, high_open=True)
        self.beta, self.gamma, self.zeta = beta, gamma, zeta  # validated by __setattr__
        # On the CPU whatever the default device: under `with torch.device("meta")` (a model
        # and its method built without memory) the draw had no value to read and raised,
        # and the counter started on meta. after_apply moves the counter to log α's device.
        if seed is None:
            # From torch's default generator, so torch.manual_seed makes runs repeatable.
            seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        self.seed = seed
        self._counter = torch.zeros((), dtype=torch.int64, device="cpu")
        self._last_offset = None  # the tensor the last training forward drew its noise at
        # Once a BatchNorm is gated by this layer (batchnorm_gated, sparsekern.nn.batchnorm)
        # each training forward keeps its z per channel (C values, in the autograd graph:
        # the BatchNorm scales its output by it), for that BatchNorm.
        self._channel_z = None

    @property
    def offset(self) -> int:
        """The noise offset of the next training forward."""
        return int(self._counter)

    @offset.setter
    def offset(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"mask option `offset` must be an int, got {type(value).__name__}")
        if not 0 <= value < 2**63:
            raise ValueError(f"mask option `offset` must be in [0, 2**63), got {value}")
        self._counter = torch.full((), int(value), dtype=torch.int64, device=self._counter.device)

    def __getstate__(self):
        # Without the last forward's z: it holds the autograd graph, which deepcopy and
        # pickle refuse, and the next training forward draws it again.
        return {**super().__getstate__(), "_channel_z": None}

    def __setstate__(self, state):
        # A mask pickled (torch.save(model)) before the offset became a tensor.
        if "offset" in state:
            state["_counter"] = torch.tensor(state.pop("offset"), dtype=torch.int64)
        state.setdefault("_last_offset", None)
        state.setdefault("inputs_per_gate", 1)
        if "keep_channel_z" in state:  # its name until the straight-through mask could be gated too
            state["batchnorm_gated"] = state.pop("keep_channel_z")
        state.setdefault("_channel_z", None)
        self.__dict__.update(state)

    def __setattr__(self, name, value):
        # The gate constants and the seed are checked whenever they are set, so the
        # forward passes them to the op unchecked (hard_concrete.sample_checked).
        if name == "beta":
            value = _real("beta", value, low=0.0, low_open=True)
        elif name == "gamma":
            value = _real("gamma", value, high=0.0, high_open=True)
        elif name == "zeta":
            value = _real("zeta", value, low=1.0, low_open=True)
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"mask option `seed` must be an int, got {type(value).__name__}")
            if not 0 <= value < 2**63:
                raise ValueError(f"mask option `seed` must be in [0, 2**63), got {value}")
            value = int(value)
        object.__setattr__(self, name, value)

    def gate_shape(self, weight: torch.Tensor) -> tuple[int, ...]:
        if not self.structured:
            return tuple(weight.shape)
        if weight.dim() == 4:  # conv: [out, in/groups, kh, kw] -> one gate per output channel
            return (weight.shape[0], 1, 1, 1)
        return (1, weight.shape[1] // self.inputs_per_gate)  # linear: [out, in] -> one gate per input neuron (or block)

    def expand_gate(self, gate: torch.Tensor) -> torch.Tensor:
        """A per-block gate [1, in/k] repeated to [1, in], broadcastable to the weight."""
        return gate if self.inputs_per_gate == 1 else gate.repeat_interleave(self.inputs_per_gate, dim=1)

    def attach(self, layer):
        w = layer.weight
        k = self.inputs_per_gate
        if k > 1 and (w.dim() != 2 or w.shape[1] % k):
            raise ValueError(f"mask option `inputs_per_gate`={k} needs a Linear whose in_features it divides, "
                             f"got weight shape {tuple(w.shape)}")
        mean = math.log((1.0 - self.droprate_init) / self.droprate_init)
        log_alpha = torch.empty(self.gate_shape(w), dtype=w.dtype, device=w.device).normal_(mean, 0.01)
        layer.weight_log_alpha = nn.Parameter(log_alpha)

    def after_apply(self, layer):
        """Also keeps the noise offsets on log α's device, where the ops read them: after
        model.to(device) they stayed on the old one until the next training forward, and an
        offset loaded in between (a method's load_state_dict) was set there. Moved off the
        meta device, which holds no values (to_empty), the counter restarts at 0 until a
        checkpoint's offset is loaded: copying it raised at the first training forward."""
        super().after_apply(layer)
        self._channel_z = None  # the next training forward draws it again, on the new device
        log_alpha = layer._parameters.get("weight_log_alpha")
        if log_alpha is None or self._counter.device == log_alpha.device:
            return
        device = log_alpha.device
        self._counter = (torch.zeros((), dtype=torch.int64, device=device) if self._counter.is_meta
                         else self._counter.to(device))
        last = self._last_offset
        self._last_offset = None if last is None or last.is_meta else last.to(device)

    def _hc(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma, "zeta": self.zeta}

    def sample(self, layer: nn.Module) -> torch.Tensor:
        """z for this forward: a fresh sample in training (advancing the offset), the
        deterministic median gate in eval. The op computes the expected L0 in the same
        pass over log α; it is kept for expected_nonzero()."""
        offset, recompute = self._forward_offset(layer)
        z, l0 = hard_concrete.sample_checked(
            layer.weight_log_alpha, self.seed, offset, self.group_size(layer), layer.training,
            self.beta, self.gamma, self.zeta,
        )
        if not recompute:
            self._keep_forward_l0(layer, l0, offset)
        if self.batchnorm_gated and layer.training:
            # A checkpoint's recompute draws the same z (same offset), so it keeps the same
            # gates for the BatchNorm's recompute. Not detached: log α learns through the
            # BatchNorm's use of it.
            self._channel_z = z.reshape(-1)
        return self.expand_gate(z)

    def masked_weight(self, layer: nn.Module) -> torch.Tensor | None:
        """Unstructured gates: w ⊙ z and the expected L0 from one fused op that stores no z
        (its backward regenerates z from (seed, offset), or in float32 on the CPU reads it
        back from w ⊙ z, which the conv keeps anyway); z is hard_concrete_sample's at
        this offset. Not on CUDA for a linear layer: there the masked linear's GEMM gates
        the weight tiles as it loads them (w_eff never written), from a sampled z."""
        w = layer.weight
        if self.structured or (w.dim() == 2 and w.device.type == "cuda"):
            return None
        offset, recompute = self._forward_offset(layer)
        w_eff, l0 = hard_concrete_masked.masked_weight_checked(
            w, layer.weight_log_alpha, self.seed, offset, layer.training, self.beta, self.gamma, self.zeta
        )
        if not recompute:
            self._keep_forward_l0(layer, l0, offset)
        return w_eff

    def _forward_offset(self, layer: nn.Module) -> tuple[torch.Tensor, bool]:
        """(the offset this forward draws its noise at, whether it is a recompute).

        Activation checkpointing (torch.utils.checkpoint, reentrant or not) runs a
        training forward again inside the backward to rebuild what it did not keep. That
        recompute must draw the noise the loss saw, or the gradients are another sample's
        (a checkpointed ResNet-20 under ConstrainedL0 got gradients off by up to 5.0). It
        is told apart by running while autograd executes a backward node, and takes the
        offset of the layer's last training forward without advancing it. That is exact
        whenever each forward's backward runs before the next training forward of the
        layer (training with or without gradient accumulation); a layer run twice before
        one backward through a checkpoint gets the second run's noise in both recomputes."""
        device = layer.weight_log_alpha.device
        if self._counter.device != device:
            self._counter = self._counter.to(device)
        # is_compiling first: dynamo would guard on _last_offset (a recompile when it is set).
        if (not torch.compiler.is_compiling() and layer.training and self._last_offset is not None
                and torch._C._current_autograd_node() is not None):
            return self._last_offset, True
        return self._counter, False

    def _keep_forward_l0(self, layer: nn.Module, l0: torch.Tensor, offset: torch.Tensor) -> None:
        """Keeps this forward's expected L0 (ForwardTerm) and advances the offset in
        training (the next forward draws fresh noise). Out of place: the ops' autograd
        keeps `offset` for the backward, so it must never change."""
        self._forward_term = ForwardTerm(layer.weight_log_alpha, l0)
        if layer.training:
            self._last_offset = offset
            self._counter = offset + 1

    def op_mask(self, layer):
        return self.sample(layer), {"kind": self.name}

    def bias_gated(self, layer):
        return self.structured and layer.weight.dim() == 4

    def gates_output_channels(self, layer):
        return self.bias_gated(layer)

    def channel_gates(self, layer):
        """Training: the z sampled by the layer's last training forward, differentiable in
        log α (kept only once a BatchNorm is gated by the layer). Eval: the median gate, a
        function of log α alone, as export bakes it."""
        if not self.gates_output_channels(layer):
            return super().channel_gates(layer)
        if not layer.training:
            return self.eval_channel_gates(layer)
        if self._channel_z is None:
            raise RuntimeError("channel_gates of a training layer before its first training forward "
                               "(or with no BatchNorm gated by it): no z has been drawn")
        return self._channel_z

    def eval_channel_gates(self, layer):
        if not self.gates_output_channels(layer):
            return super().eval_channel_gates(layer)
        return self.gate(layer).reshape(-1)

    def gate(self, layer, dtype=None):
        log_alpha = layer.weight_log_alpha.detach()
        s = torch.sigmoid(log_alpha.to(mask_math.compute_dtype(log_alpha, layer.weight.dtype)) / self.beta)
        z = (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)
        if self.structured:  # the forward's z has log α's dtype there (unstructured: the fused op keeps it in float32)
            z = z.to(log_alpha.dtype)
        return self.expand_gate(z.to(dtype or layer.weight.dtype))

    def group_size(self, layer: nn.Module) -> int:
        """Weights per gate."""
        return layer.weight.numel() // layer.weight_log_alpha.numel()

    def expected_nonzero(self, layer: nn.Module) -> torch.Tensor:
        """E[number of nonzero weights], differentiable in log α (the L0 constraint/penalty).

        The layer's last forward computed it already, in the same pass as the gates: that
        tensor is returned while it still stands for log α (ForwardTerm.current), and the
        L0 term's gradient then joins the gates' in their one backward pass. Otherwise it is
        computed afresh (a second pass over log α, and a second backward)."""
        cached = self._current_term(layer.weight_log_alpha)
        if cached is not None:
            return cached
        return ops.hard_concrete_l0(layer.weight_log_alpha, self.group_size(layer), **self._hc())

    def expected_density(self, layer: nn.Module) -> torch.Tensor:
        return self.expected_nonzero(layer) / layer.weight.numel()

    clamp_box = ("weight_log_alpha", *HC_LOG_ALPHA_RANGE)

    def options(self):
        return {
            "structured": self.structured,
            "droprate_init": self.droprate_init,
            "beta": self.beta,
            "gamma": self.gamma,
            "zeta": self.zeta,
            "seed": self.seed,
            **({"inputs_per_gate": self.inputs_per_gate} if self.inputs_per_gate > 1 else {}),
        }


MASK_KINDS: dict[str, type[MaskKind]] = {
    k.name: k for k in (BinaryMask, StraightThroughMask, SigmoidMask, RelaxedMask, HardConcreteMask)
}


def mask_kind_class(kind: str) -> type[MaskKind]:
    """The class for a kind name; hyphens are accepted for underscores ("hard-concrete")."""
    if not isinstance(kind, str):
        raise TypeError(f"`mask` must be a mask kind name (str), got {type(kind).__name__}")
    cls = MASK_KINDS.get(kind.replace("-", "_"))
    if cls is None:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {sorted(MASK_KINDS)}")
    return cls


def make_mask(kind: str, **options) -> MaskKind:
    """A new mask kind object; raises TypeError naming any option the kind does not take."""
    cls = mask_kind_class(kind)
    # From the signature, not an instance: constructing one may draw from the RNG.
    known = {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"mask kind {cls.name!r} takes no option(s) {unknown}; its options are {sorted(known) or 'none'}"
        )
    return cls(**options)
