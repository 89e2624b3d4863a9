"""The methods `sparsekern train` offers and their command-line options, generated from the
method classes' constructor signatures (inspect), so a new constructor argument becomes a
flag without touching the CLI.

Each constructor argument after `model` becomes `--kebab-case-name`, typed by its default
(bool → --x/--no-x, int, float, str; None defaults by the annotation), `include` /
`exclude` take one or more layer patterns, and a str argument whose method module holds a
tuple NAMEs / NAME (REGULARIZERS for `regularizer`, MODES for `mode`) gets those choices.
A flag shared by several methods appears once, with every method's default in its help.
Flags default to "not given", so the method's own default applies and a flag the chosen
method does not take is an error that names it.

A few arguments come from the run instead of a flag of their own (DERIVED below):
sparsity / target_density from --sparsity / --density, epochs_per_round from --epochs,
seed from --seed, and end_iteration from --end-iteration, whose default is derived from
the schedule (see `derived_end_iteration`).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
from dataclasses import dataclass, field

# CLI name → (module in sparsekern.methods, class name, description). The descriptions
# cite METHODS.md: the paper, and the defaults the paper or the authors' code set.
METHODS: dict[str, tuple[str | None, str | None, str]] = {
    "dense": (None, None, "Plain dense training (the baseline every method is compared to)."),
    "imp": ("imp", "IMP",
            "Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; open_lth). "
            "Round-based: each round trains --epochs epochs, then prunes prune_fraction=0.2 of "
            "the remaining weights globally by |w| and rewinds to iteration rewind_iteration "
            "(0: winning ticket). --rounds R gives R-1 prunings; with --sparsity/--density and "
            "no --prune-fraction, the fraction is set so that R-1 prunings reach it."),
    "oneshot": ("oneshot", "OneShot",
                "One-shot magnitude pruning + fine-tuning (Han et al. 2015). Trains dense for "
                "--pretrain-epochs, prunes the target sparsity globally by |w| at once, then "
                "fine-tunes --epochs epochs with the mask fixed."),
    "gmp": ("gmp", "GradualMagnitude",
            "Gradual magnitude pruning (Zhu & Gupta 2017): sparsity raised every frequency=100 "
            "steps along s_t = s_f + (s_i - s_f)(1 - t/T)^3 up to end_iteration T; masks monotone."),
    "dpf": ("dpf", "DPF",
            "Dynamic pruning with feedback (Lin et al., ICLR 2020): mask recomputed from |w| every "
            "period=16 steps, straight-through backward (pruned weights keep learning and can "
            "return), Zhu & Gupta schedule reaching the target at the second lr decay (the "
            "paper), last FC / biases / BN dense. mode: global (paper) | layerwise | structured "
            "(output-channel l2 norm, the BatchNorm after a pruned filter gated with it; the export is "
            "purged; without --include, only the convs whose channels purge can remove, e.g. a ResNet "
            "block's first conv)."),
    "cs": ("cs", "ContinuousSparsification",
           "Continuous Sparsification (Savarese et al., NeurIPS 2020): soft mask "
           "sigma(beta*s)/sigma(s0), penalty lam*sum(mask) (code: lam=1e-8, s0=0), beta raised to "
           "beta_final=200 over each round, soft reset of s and rewind between rounds, then the "
           "ticket 1[s > 0] is retrained from the rewound weights for --ticket-epochs. Cannot hit "
           "an exact sparsity: the achieved one is reported."),
    "concave": ("concave", "ConcaveRegularization",
                "Concave regularisers on a relaxed mask m in [0,1] (Fracastoro et al.): loss + "
                "lam*sum r(m), r = l1 (lam 3e-6) or log (lam 1e-6, eps 0.1), m0=1/2, projected "
                "gradient; each round ends with m < alpha=0.01 pruned for good and the weights "
                "rewound (paper: 3 rounds). The paper's ablations: --prune-fraction (a fixed "
                "percentage per round) and --reparameterization sigmoid (m = sigma(beta*s), beta "
                "raised to beta_final=200 over each round as in CS)."),
    "l0": ("l0", "ConstrainedL0",
           "Constrained L0 with hard-concrete gates (Gallego-Posada et al., NeurIPS 2022; Louizos "
           "et al. 2018): expected density <= target enforced by Lagrange multipliers "
           "(simultaneous GDA with dual restarts), gates beta=2/3, gamma=-0.1, zeta=1.1; "
           "structured gates (one per conv channel / linear input / attention head) make the export "
           "purged; without --include they go on the convs whose channels purge can remove (a ResNet "
           "block's first conv) and every Linear."),
    "l0-penalized": ("l0", "PenalizedL0",
                     "Penalised L0 (Louizos et al. 2018), the constrained paper's foil: loss + "
                     "lam * sum E[L0] with hard-concrete gates; the achieved density follows lam."),
}

ROUND_BASED = ("imp", "cs", "concave")

# Constructor arguments the run supplies (not a flag of their own).
DERIVED = {
    "model": "the model being trained",
    "sparsity": "--sparsity S (or 1 - --density)",
    "target_density": "--density D (or 1 - --sparsity), or --layer-density LAYER=D ... (l0)",
    "epochs_per_round": "--epochs",
    "seed": "--seed",
}

# Constructor arguments that share a run-level flag: --mask-lr goes to the constructor
# where it takes mask_lr (CS), else to method.param_groups(mask_lr=...).
RUN_LEVEL = {"mask_lr"}

# Help for arguments whose method docstrings do not describe them.
FALLBACK_HELP = {
    "prune_fraction": "fraction of the remaining weights pruned per round",
    "rewind_iteration": "optimiser step whose weights each round rewinds to (0: the initialisation)",
    "ignore_classifier": "leave the classifier dense (the last nn.Linear; without one, the last nn.Conv2d)",
    "include": "fnmatch patterns of the layers to prune (default: every Conv2d and Linear; an attention A counts as "
               "A.in_proj and A.out_proj; dpf --mode structured and l0 / l0-penalized --structured leave out the convs "
               "whose channels the purged export cannot remove, e.g. a ResNet's stem, second convs and shortcuts)",
    "exclude": "fnmatch patterns of layers to leave dense",
    "end_iteration": "step at which the sparsity schedule reaches its target",
    "start_iteration": "step at which the sparsity schedule starts",
    "frequency": "steps between two mask updates",
    "initial_sparsity": "sparsity at start_iteration",
    "period": "steps between two mask recomputations",
    "mode": "how the mask is chosen",
    "gate_batchnorms": "--mode structured: a BatchNorm2d right after a pruned filter outputs 0 for it, its γ and β "
                       "masked with the filter (so the purged export removes the channel); --no-gate-batchnorms keeps "
                       "plain BatchNorms, as the authors' code (a pruned channel outputs relu(β))",
    "structured": "one gate per conv output channel / linear input neuron (attention out_proj: "
                  "per head) instead of per weight (the export is purged); without --include, only the convs "
                  "whose channels purge can remove are gated (a ResNet block's first conv), and every Linear",
    "layerwise": "one density constraint per layer instead of one for the whole model",
}


def method_class(name: str):
    """The class behind CLI method `name` (None for dense), or ValueError if unknown or
    not importable in this installation."""
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; expected one of {list(METHODS)}")
    module, cls_name, _ = METHODS[name]
    if module is None:
        return None
    methods = importlib.import_module("sparsekern.methods")
    cls = getattr(methods, cls_name, None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module(f"sparsekern.methods.{module}"), cls_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--method {name}: sparsekern.methods.{cls_name} is not available ({e})") from e
    return cls


def available_methods() -> list[str]:
    out = []
    for name in METHODS:
        try:
            method_class(name)
            out.append(name)
        except ValueError:
            pass
    return out


@dataclass
class Option:
    """One constructor argument as a flag: its type, choices and each method's default."""

    name: str
    kind: str  # "bool", "int", "float", "str", "patterns", "literal", "end_iteration"
    choices: tuple | None = None
    defaults: dict = field(default_factory=dict)  # method → default (inspect.Parameter.empty: required)
    helps: dict = field(default_factory=dict)     # method → its docstring's description

    @property
    def help(self) -> str:
        """One text when the methods describe the argument alike, else one per method."""
        by_text: dict[str, list[str]] = {}
        for method, text in self.helps.items():
            if text:
                by_text.setdefault(text, []).append(method)
        if len(by_text) <= 1:
            return next(iter(by_text), "")
        return " | ".join(f"{', '.join(ms)}: {t}" for t, ms in by_text.items())

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _kind(param: inspect.Parameter) -> str:
    if param.name in ("include", "exclude"):
        return "patterns"
    if param.name == "end_iteration":
        return "end_iteration"
    default = param.default
    if default is not inspect.Parameter.empty and default is not None:
        for t in (bool, int, float, str):
            if type(default) is t:
                return t.__name__
        return "literal"
    ann = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", str(param.annotation))
    parts = {p.strip() for p in str(ann).replace("Optional[", "").rstrip("]").split("|")} - {"None"}
    for t in ("bool", "int", "float", "str"):
        if parts == {t}:
            return t
    return "literal"


def _choices(cls, param: inspect.Parameter) -> tuple | None:
    module = inspect.getmodule(cls)
    for const in (param.name.upper() + "S", param.name.upper()):
        values = getattr(module, const, None)
        if isinstance(values, tuple) and values and all(isinstance(v, str) for v in values):
            return values
    return None


_DOC_ITEM = re.compile(r"^(\s*)([a-z_][a-z0-9_]*(?:\s*/\s*[a-z_][a-z0-9_]*)*):\s+(\S.*)$")


def docstring_help(cls) -> dict[str, str]:
    """"name: text" items of the class (else module) docstring, continuation lines joined;
    "include / exclude: text" describes both."""
    out: dict[str, str] = {}
    for doc in (inspect.getdoc(cls) or "", inspect.getmodule(cls).__doc__ or ""):
        current, indent = None, 0
        for line in doc.splitlines():
            m = _DOC_ITEM.match(line)
            if m and len(m.group(1)) <= 4:
                names = [n.strip() for n in m.group(2).split("/")]
                current, indent = names, len(m.group(1))
                for n in names:
                    out.setdefault(n, m.group(3).strip())
            elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
                for n in current:
                    if out[n] is not None:
                        out[n] = out[n] + " " + line.strip()
            else:
                current = None
    return out


def constructor_parameters(cls) -> list[inspect.Parameter]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "model"]


def collect_options(methods: list[str] | None = None) -> dict[str, Option]:
    """Every flag of the given methods (default: all available), keyed by argument name."""
    options: dict[str, Option] = {}
    for method in methods if methods is not None else available_methods():
        cls = method_class(method)
        if cls is None:
            continue
        docs = docstring_help(cls)
        for p in constructor_parameters(cls):
            if p.name in DERIVED or p.name in RUN_LEVEL:
                continue
            kind = _kind(p)
            opt = options.setdefault(p.name, Option(p.name, kind, _choices(cls, p)))
            if opt.kind != kind:  # methods disagree: int and float widen to float, else a literal
                opt.kind = "float" if {opt.kind, kind} == {"int", "float"} else "literal"
            opt.defaults[method] = p.default
            opt.helps[method] = docs.get(p.name) or FALLBACK_HELP.get(p.name, "")
    return options


def _show(value) -> str:
    return "required" if value is inspect.Parameter.empty else repr(value)


def parse_end_iteration(text: str):
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'none', got {text!r}") from None
    return value


def parse_literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_method_arguments(parser: argparse.ArgumentParser, options: dict[str, Option]) -> None:
    """One argument group with every method option; defaults stay unset (SUPPRESS) so
    only the flags actually given reach the method."""
    group = parser.add_argument_group(
        "method options (generated from the method constructors; each defaults to its method's own default)")
    for opt in options.values():
        if len(opt.defaults) == len(METHODS) - 1 and len({_show(d) for d in opt.defaults.values()}) == 1:
            defaults = f"every method: {_show(next(iter(opt.defaults.values())))}"
        else:
            defaults = ", ".join(f"{m}: {_show(d)}" for m, d in opt.defaults.items())
        extra = ""
        if opt.kind == "end_iteration":
            extra = ("; when not given: the step of the second lr decay (--milestones), or 3/4 of the "
                     "training steps without a multistep schedule; 'none' passes None")
        text = f"{opt.help} [{defaults}{extra}]".strip().replace("%", "%%")
        kw: dict = {"default": argparse.SUPPRESS, "help": text}
        if opt.kind == "bool":
            group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if opt.kind == "patterns":
            kw.update(nargs="+", metavar="PATTERN")
        elif opt.kind == "end_iteration":
            kw.update(type=parse_end_iteration, metavar="STEP")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(opt.kind, parse_literal)
            kw["metavar"] = opt.kind.upper()
        if opt.choices:
            kw["choices"] = opt.choices
            kw.pop("metavar", None)
        group.add_argument(opt.flag, **kw)


def method_epilog(methods: list[str]) -> str:
    """Per-method sections for --help: the description and the flags it takes."""
    lines = ["methods:"]
    for name in methods:
        _, cls_name, desc = METHODS[name]
        lines.append(f"  {name}" + (f" ({cls_name})" if cls_name else ""))
        lines += ["    " + ln for ln in _wrap(desc, 84)]
        try:
            cls = method_class(name)
        except ValueError as e:
            lines.append(f"    unavailable: {e}")
            continue
        if cls is None:
            continue
        flags = []
        for p in constructor_parameters(cls):
            if p.name in DERIVED:
                flags.append(f"{p.name} <- {DERIVED[p.name]}")
            else:
                flags.append(f"--{p.name.replace('_', '-')} {_show(p.default)}")
        lines += ["    options: " + ln if i == 0 else "             " + ln
                  for i, ln in enumerate(_wrap("; ".join(flags), 75))]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def method_kwargs(method: str, given: dict, *, sparsity: float | None, density: float | None, epochs: int,
                  seed: int, end_iteration_default, rounds: int, layer_density: dict | None = None) -> dict:
    """The constructor keyword arguments for `method`: the flags given (`given`: argument
    name → value, only those on the command line) plus the derived ones. Raises ValueError
    naming the flag when the method does not take it or a required value is missing."""
    cls = method_class(method)
    if cls is None:
        if given:
            raise ValueError(f"--method dense takes no method options; got {', '.join(_flags(given))}")
        if sparsity is not None:
            raise ValueError("--method dense trains dense: --sparsity/--density do not apply")
        return {}
    params = {p.name: p for p in constructor_parameters(cls)}
    unknown = [n for n in given if n not in params]
    if unknown:
        takers = collect_options()
        msgs = [f"{_flag(n)} (taken by: {', '.join(takers[n].defaults) if n in takers else 'no method'})" for n in unknown]
        raise ValueError(f"--method {method} does not take {', '.join(msgs)}")
    kwargs = dict(given)
    if "sparsity" in params and sparsity is not None:
        kwargs["sparsity"] = sparsity
    if "target_density" in params and sparsity is not None:
        # The value given, not 1 - (1 - D): that would not round-trip exactly.
        kwargs["target_density"] = density if density is not None else 1.0 - sparsity
    if layer_density is not None:
        if "target_density" not in params:
            raise ValueError(f"--method {method} takes no per-layer densities: drop --layer-density")
        kwargs["target_density"] = dict(layer_density)
    if sparsity is not None and "sparsity" not in params and "target_density" not in params:
        if method == "imp" and "prune_fraction" in params and "prune_fraction" not in given:
            if rounds < 2:
                raise ValueError("--method imp with --sparsity/--density needs --rounds >= 2 (rounds - 1 prunings)")
            kwargs["prune_fraction"] = 1.0 - (1.0 - sparsity) ** (1.0 / (rounds - 1))
        else:
            raise ValueError(f"--method {method} has no target sparsity argument: drop --sparsity/--density"
                             + (" (its sparsity follows from its own options)" if method != "imp" else ""))
    if "epochs_per_round" in params:
        kwargs["epochs_per_round"] = epochs
    if "seed" in params:
        kwargs["seed"] = seed
    if "end_iteration" in params and "end_iteration" not in given:
        kwargs["end_iteration"] = end_iteration_default
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        hint = {"sparsity": "--sparsity S or --density D", "target_density": "--density D or --sparsity S"}
        raise ValueError(f"--method {method} needs " + ", ".join(hint.get(n, _flag(n)) for n in missing))
    return kwargs


def derived_end_iteration(milestones: list[int] | None, epochs: int, steps_per_epoch: int) -> int:
    """DPF reaches its target at the second lr decay (the paper); GMP shares the default.
    Without two milestones: 3/4 of training, where a 50%/75% step schedule decays."""
    if milestones and len(milestones) >= 2:
        epoch = min(milestones[1], epochs)
    else:
        epoch = 0.75 * epochs
    return max(1, round(epoch * steps_per_epoch))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The run-level flags the derived arguments and param_groups' arguments come from.
_FROM_FLAG = {"sparsity": "--sparsity", "target_density": "--density", "epochs_per_round": "--epochs",
              "seed": "--seed", "lr": "--lr", "weight_decay": "--weight-decay", "mask_lr": "--mask-lr"}


def with_flags(message: str, layer_density: bool = False) -> str:
    """`message` (a method's ValueError) with the flag after each method argument it names
    in backticks: "`period` must be >= 1" → "`period` (--period) must be >= 1", so the CLI
    user sees which flag to change. layer_density: target_density came from
    --layer-density (an unknown layer there was blamed on --density)."""
    names = {p.name for m in available_methods() if (cls := method_class(m)) for p in constructor_parameters(cls)}
    from_flag = {**_FROM_FLAG, "target_density": "--layer-density"} if layer_density else _FROM_FLAG

    def flag(match: re.Match) -> str:
        name = match[1]
        if name in from_flag:
            return f"{match[0]} ({from_flag[name]})"
        return f"{match[0]} ({_flag(name)})" if name in names and name not in DERIVED else match[0]

    return re.sub(r"`(\w+)`", flag, message)


def _flags(given: dict) -> list[str]:
    return [_flag(n) for n in given]
