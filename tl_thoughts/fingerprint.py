"""Fingerprints of weights: which model a patch or an update belongs to.

A fingerprint reads every parameter, cheaply: the SHA-256 of each tensor's name, shape and the
wrapping 32-bit sums of its float32 bit patterns along every row and every column (the last two
dimensions). Changing any single element changes its row's sum and its column's sum, so every
changed parameter changes the fingerprint; the sums are integers, exact and independent of the
order of summation, so the fingerprint is the same on every machine and thread count. A float64
copy of a float32 model (``tl_thoughts.computing_in``) has the float32 model's fingerprint; a
float16 copy does not (its values are others). It costs about 60 ms for the default model's 163M
parameters (one pass over memory), and does not change with the device.
"""

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """The fingerprint (64 hex digits) of named tensors (see the module's docstring).

    Example:
        >>> a = {"w": torch.ones(2, 3)}
        >>> fingerprint(a) == fingerprint({"w": torch.ones(2, 3, dtype=torch.float64)})
        True
        >>> w = torch.ones(2, 3); w[1, 2] = 1.0000001  # one element, one float32 ulp
        >>> fingerprint(a) == fingerprint({"w": w})
        False
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        # no copy for a float32 tensor, also a transposed one (tl_thoughts' linear layout): the
        # sums read it in place (integer sums do not depend on the order)
        bits = t.to(torch.float32).cpu().view(torch.int32)
        if bits.dim() < 2:
            bits = bits.reshape(1, -1)
        h.update(bits.sum(-1, dtype=torch.int32).flatten().numpy().tobytes())  # every row
        h.update(bits.sum(-2, dtype=torch.int32).flatten().numpy().tobytes())  # every column, per matrix
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of every parameter of ``model`` as it is now (patches applied included).

    Example:
        >>> model_fingerprint(model) == model_fingerprint(model)
        True
    """
    return fingerprint(dict(model.named_parameters()))
