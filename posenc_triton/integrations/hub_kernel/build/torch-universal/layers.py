"""The layers ``kernels.LocalLayerRepository`` loads from this repository."""

from posenc_triton.integrations._hub import RotaryPosEmb, RotaryPosEmbFP32, RotaryPosEmbInterleaved

__all__ = ["RotaryPosEmb", "RotaryPosEmbFP32", "RotaryPosEmbInterleaved"]
