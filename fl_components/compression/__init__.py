"""Update and model compression: fewer bytes on the wire, in the clear and under SecAgg.

One module per method, each opening with its paper: :mod:`.qsgd` (stochastic b-bit
quantization), :mod:`.top_k` (largest values), :mod:`.random_k` (coordinates shared by every
site of a round), :mod:`.error_feedback` (residual memory), :mod:`.download` (model deltas);
:mod:`.secure` (the same under secure aggregation); :mod:`.encoded` is the wire format,
:mod:`.codec` the config-driven entry points and :mod:`.site` the site's step.
"""

from fl_components.compression.codec import decode_update, encode_dense, encode_update
from fl_components.compression.encoded import CompressionError, EncodedUpdate, Method
from fl_components.compression.error_feedback import load_residual, save_residual

__all__ = [
    "CompressionError",
    "EncodedUpdate",
    "Method",
    "decode_update",
    "encode_dense",
    "encode_update",
    "load_residual",
    "save_residual",
]
