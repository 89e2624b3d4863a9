"""Validation of a method's state_dict before load_state_dict changes anything: a state
from another model, another method configuration or a damaged checkpoint gets a ValueError
/ TypeError naming the entry, and the method and its model are left as they were (before,
a wrong-shape mask raised halfway through the copy, with the earlier layers already
overwritten)."""
from __future__ import annotations

import numbers
from typing import Any

import torch

KEYS = ("method", "iteration", "epoch", "round", "rewind_iteration", "masks", "noise", "rewind_state", "extra")


def check_tensor(where: str, value: Any, shape: torch.Size) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state {where} must be a tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"state {where} has shape {tuple(value.shape)}, this model's is {tuple(shape)}")


def check_tensors(where: str, given: Any, expected: dict[str, torch.Size]) -> None:
    """`given` is a dict with exactly `expected`'s keys, each a tensor of its shape."""
    if not isinstance(given, dict):
        raise TypeError(f"state {where} must be a dict, got {type(given).__name__}")
    if set(given) != set(expected):
        raise ValueError(f"state {where} entries differ: missing {sorted(set(expected) - set(given))}, "
                         f"unexpected {sorted(set(given) - set(expected))}")
    for key, shape in expected.items():
        check_tensor(f"{where}[{key!r}]", given[key], shape)


def check_mask_values(given: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    """Each mask entry has its kind of values: a bool mask bool, a learnable one floating
    point without NaN. Copied in unchecked, a float 0.5 became True in a bool mask, and a
    NaN log α or score made every later penalty and gradient NaN."""
    for key, ref in live.items():
        value = given[key]
        if (value.dtype == torch.bool) != (ref.dtype == torch.bool) or not (value.dtype == torch.bool
                                                                           or value.is_floating_point()):
            raise TypeError(f"state ['masks'][{key!r}] must be {'bool' if ref.dtype == torch.bool else 'floating point'}"
                            f", got {value.dtype}")
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            raise ValueError(f"state ['masks'][{key!r}] holds NaN")


def check_state(method, state: Any, masks: dict[str, torch.Size], noisy: set[str]) -> None:
    """Every check load_state_dict needs, none of them changing anything. `masks`: the
    mask entries the state must hold ("<layer>.<state name>" -> shape); `noisy`: the layers
    with hard-concrete noise offsets."""
    name = type(method).__name__
    if not isinstance(state, dict) or state.get("method") != name:
        got = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state is not a {name} state_dict (got {got!r})")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"state lacks {missing}")
    for key in ("iteration", "epoch", "round", "rewind_iteration"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"state['{key}'] must be an int >= 0, got {value!r}")
    check_tensors("['masks']", state["masks"], masks)
    noise = state["noise"]
    if not isinstance(noise, dict) or set(noise) != noisy:
        raise ValueError(f"state['noise'] must name the hard-concrete layers {sorted(noisy)}, got "
                         f"{sorted(noise) if isinstance(noise, dict) else type(noise).__name__}")
    for layer, pair in noise.items():
        # The mask's seed / offset setters take [0, 2**63) only; left to them, a pair out of
        # range raised halfway through the load, with the earlier layers' masks overwritten.
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v < 2**63 for v in pair)):
            raise ValueError(f"state['noise'][{layer!r}] must be a (seed, offset) pair of ints in [0, 2**63), "
                             f"got {pair!r}")
    if state["rewind_state"] is not None:
        check_tensors("['rewind_state']", state["rewind_state"], method._rewind_shapes())
    extra = state["extra"]
    expected = set(method._extra_state())
    if not isinstance(extra, dict) or set(extra) != expected:
        raise ValueError(f"state['extra'] must hold {sorted(expected)}, got "
                         f"{sorted(extra) if isinstance(extra, dict) else type(extra).__name__}")
    method._check_extra_state(extra)
