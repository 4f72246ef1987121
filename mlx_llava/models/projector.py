"""The projector: visual features -> the language model's word-embedding space.

`linear` is LLaVA's single matrix W; `mlp2x_gelu` is LLaVA-1.5's two-layer
MLP. Layer names are llava-hf's (`linear_1`, `linear_2`).
"""

import mlx.core as mx
import mlx.nn as nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
ACTIVATIONS = {"gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx, "quick_gelu": nn.gelu_fast_approx}


class Projector(nn.Module):
    def __init__(self, projector_type, in_dims, out_dims, bias=True, hidden_act="gelu"):
        super().__init__()
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {projector_type!r}; expected one of {PROJECTOR_TYPES}")
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown projector activation {hidden_act!r}")
        self.projector_type = projector_type
        self.act = ACTIVATIONS[hidden_act]
        self.linear_1 = nn.Linear(in_dims, out_dims, bias=bias)
        if projector_type == "mlp2x_gelu":
            self.linear_2 = nn.Linear(out_dims, out_dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.linear_1(x)
        if self.projector_type == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x
