"""The inference contract a model file must keep, checked when it loads and on every output it gives.

An export's input is ``input``, float32 ``(N, 3, S, S)`` with ``S`` the metadata's image size; its outputs are
``p_male`` ``(N,)``, then ``age`` ``(N,)`` and ``age_probs`` ``(N, ages)`` when it has an age head. A file that
breaks it is refused in one line at load time, before it can make predict allocate what its metadata claims.
At run time, a face whose outputs are not finite is an error, never a JSON NaN or a gender picked from NaN.
Torch-free: ONNX inference uses it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AgeGenderError

if TYPE_CHECKING:
    from .meta import CheckpointMeta

INPUT = "input"


def _dims(arg: Any) -> list[int | str | None]:
    shape = getattr(arg, "shape", None)
    return list(shape) if isinstance(shape, list | tuple) else []


def check_onnx_contract(session: Any, meta: CheckpointMeta, path: str | os.PathLike[str]) -> None:
    """``session``'s input and outputs against the contract and ``meta`` (names, ranks, fixed sizes, float)."""
    cfg = meta.config
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT]:
        raise AgeGenderError(
            f"{path}: ONNX model inputs are {[i.name for i in inputs][:4]}, expected one named "
            f"{INPUT!r} (not an agegender export?)"
        )
    dims, size = _dims(inputs[0]), cfg.image_size
    fixed = dims[1:] if len(dims) == 4 else []
    if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in zip(fixed, (3, size, size))):
        raise AgeGenderError(f"{path}: ONNX input {INPUT!r} has shape {dims}, but its metadata says [batch, 3, {size}, {size}]")
    if inputs[0].type != "tensor(float)":
        raise AgeGenderError(f"{path}: ONNX input {INPUT!r} is {inputs[0].type}, expected tensor(float)")
    outputs = {o.name: o for o in session.get_outputs()}
    wanted = {"p_male": 1} if cfg.age_head == "none" else {"p_male": 1, "age": 1}
    if cfg.age_head == "dex":
        wanted["age_probs"] = 2
    for name, rank in wanted.items():
        if name not in outputs:
            raise AgeGenderError(f"{path}: ONNX model has no {name} output (outputs: {sorted(outputs)[:6]})")
        out_dims = _dims(outputs[name])
        known = bool(out_dims)  # an output of unknown shape is checked on every run instead
        if (known and len(out_dims) != rank) or outputs[name].type not in ("tensor(float)", "tensor(double)"):
            raise AgeGenderError(
                f"{path}: ONNX output {name} is {outputs[name].type} {out_dims}, expected a float tensor of rank {rank}"
            )
    probs = _dims(outputs["age_probs"]) if "age_probs" in wanted else []
    if len(probs) == 2 and isinstance(probs[1], int) and probs[1] != cfg.ages:
        raise AgeGenderError(
            f"{path}: ONNX output age_probs has {probs[1]} ages, but its metadata says {cfg.age_min}-{cfg.age_max} ({cfg.ages})"
        )


def check_finite_outputs(n: int, p_male: np.ndarray, age: np.ndarray | None) -> None:
    """Raise an AgeGenderError unless there are ``n`` finite P(male) in [0, 1] (and ``n`` finite ages).

    The caller reports it for the image those faces belong to; the next image is classified as usual.
    """
    p_male = np.asarray(p_male)
    if p_male.shape != (n,) or (age is not None and np.shape(age) != (n,)):
        got = f"{p_male.shape}" + ("" if age is None else f" and age {np.shape(age)}")
        raise AgeGenderError(f"the model gave P(male) {got} for {n} faces (a broken model file?)")
    bad = ~np.isfinite(p_male) | (p_male < 0) | (p_male > 1)
    if age is not None:
        bad |= ~np.isfinite(age)
    if bad.any():
        raise AgeGenderError(
            f"the model's output is not a finite probability or age for {int(bad.sum())} of {n} "
            f"faces (NaN or Inf: a broken model file?)"
        )
