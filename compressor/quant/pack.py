"""Compact storage of sparse low-bit layers: kept codes two per byte, a 1-bit mask, fp16 scales.

``pack`` / ``unpack`` are exact inverses for codes below 16 (4-bit and less): the file written by
the pipeline (``quantized.safetensors``) is the real size of the compressed layers.
"""

from __future__ import annotations

import torch


def pack_layer(codes: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """``codes`` uint8 ``[rows, cols]`` (< 16), ``mask`` bool, ``scales``/``zeros`` ``[rows, groups]``."""
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_layer stores 4-bit codes: a code above 15 was given")
    values = _nibbles(codes[mask])
    bits = mask.flatten().to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    mask_bytes = (bits * weights).sum(1, dtype=torch.int32).to(torch.uint8)
    return {"values": values.contiguous(), "mask": mask_bytes.contiguous(),
            "scales": scales.to(torch.float16).contiguous(), "zeros": _nibbles(zeros.flatten()),
            "shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Values below 16, two per byte (low nibble first), padded with a zero to an even count."""
    flat = codes.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unnibble(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], 1).flatten()[:count]


def unpack_layer(packed: dict[str, torch.Tensor], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized fp32 weight and the bool mask of a packed layer."""
    rows, cols = (int(x) for x in packed["shape"])
    bits = packed["mask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)
    mask = (bits & 1).flatten()[: rows * cols].bool().reshape(rows, cols)
    kept = _unnibble(packed["values"], int(mask.sum()))
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    codes[mask] = kept.float()
    group = torch.arange(cols) // group_size
    scales = packed["scales"].float()
    zeros = _unnibble(packed["zeros"], scales.numel()).float().reshape(scales.shape)
    scales, zeros = scales[:, group], zeros[:, group]
    return (codes - zeros) * scales * mask, mask
