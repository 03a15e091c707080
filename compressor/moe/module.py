"""The converted FFN: a router picks k of E experts per token; unselected neurons contribute their mean.

Two forwards give the same result (up to float rounding):

* masked (``forward_masked``): the dense FFN runs, then the activation ``a`` entering the down
  projection is replaced by ``mu`` (``variant="mean"``) or 0 (``"zero"``) at the unselected experts'
  neurons. No compute is saved; this is the reference's form and the one used for quality figures.
* expert compute (``forward_experts``): tokens are grouped by expert and only the selected experts'
  rows and columns are multiplied (``torch._grouped_mm``, one grouped GEMM per projection; an expert
  loop where that kernel is missing). Mean replacement becomes a bias: ``sum_e B_e - sum_{e selected}
  B_e`` with ``B_e = W_down[:, e] mu_e`` (``stats.expert_bias``). FFN multiply-adds scale as k/E plus
  the router's ``d*E + E*E``. Needs ``pack()``: a copy of the FFN weights in expert-major layout, each
  expert padded to a multiple of 8 neurons with zero weights (exact; grouped GEMMs want 16-byte rows).

The module keeps the dense FFN's layers under their own names, so the model's state dict (what
``save_pretrained`` writes) is unchanged; router, ``mu`` and bias tables are non-persistent buffers,
saved apart by ``compressor.moe.io``. Source: G-MoEfication (Lee et al., EMNLP 2024), algorithms.md s5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.moe.ffn import FFNSpec, activation, neuron_weights
from compressor.moe.split import expert_order
from compressor.moe.stats import expert_bias

PAD = 8  # neurons per expert rounded up to this for the grouped GEMM


class Router(nn.Module):
    """``Linear(d -> E) -> tanh -> Linear(E -> E)`` on ``x / ||x||``, no biases; the first layer starts at the
    normalised cluster centroids, the second at the identity. Returns logits ``[..., E]``."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        experts, d = centroids.shape
        self.proj = nn.Linear(d, experts, bias=False)
        self.mix = nn.Linear(experts, experts, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(F.normalize(centroids.float(), dim=-1))
            self.mix.weight.copy_(torch.eye(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.proj(F.normalize(x, dim=-1))))


def router_logits(x: torch.Tensor, proj: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """The router as a function of its two weights (``[E, d]``, ``[E, E]``): logits ``[n, E]`` for ``x`` ``[n, d]``."""
    return torch.tanh(F.normalize(x, dim=-1) @ proj.to(x.dtype).t()) @ mix.to(x.dtype).t()


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a`` ``[M, K]`` rows grouped by ``offs`` (int32 cumulative ends, ``[G]``) times ``b`` ``[G, K, N]``: ``[M, N]``.
    ``torch._grouped_mm`` where it runs for this device and dtype, else one matmul per non-empty group."""
    key = (a.device.type, a.dtype)
    if _GROUPED_MM_OK.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            out = torch._grouped_mm(a, b, offs=offs)
            _GROUPED_MM_OK[key] = True
            return out
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    out = a.new_empty(a.shape[0], b.shape[-1])
    ends = offs.tolist()
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = end
    return out


@dataclass
class Packed:
    """Expert-major weights: ``w_in`` ``[E, g*m, d]`` (gate rows then up rows for SwiGLU), ``b_in`` ``[E, m]`` or
    None, ``w_out`` ``[E, d, m]``, ``bias`` ``[E, d]`` (B_e), ``bias_total`` ``[d]``; ``m`` padded neurons/expert."""

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    bias: torch.Tensor
    bias_total: torch.Tensor
    m: int


class MoEFFN(nn.Module):
    """A block's FFN as E experts with a top-k router (see the module docstring).

    Args:
        ffn: the dense FFN module (its layers are adopted under their own names).
        spec: where its layers are (``compressor.moe.ffn``).
        assignment: ``[d_ff]`` expert of each neuron (balanced).
        mu: ``[d_ff]`` mean activation entering the down projection.
        router_proj, router_mix: router weights ``[E, d]``, ``[E, E]``.
        k: experts per token; variant: mean, zero or random (random experts, mean replacement).
    """

    def __init__(self, ffn: nn.Module, spec: FFNSpec, assignment: torch.Tensor, mu: torch.Tensor,
                 router_proj: torch.Tensor, router_mix: torch.Tensor, k: int, variant: str = "mean", seed: int = 0):
        super().__init__()
        object.__setattr__(self, "dense", ffn)  # the original module, unregistered: detach_moe puts it back
        for name, child in ffn.named_children():
            self.add_module(name, child)
        self.spec = spec
        self.experts = router_proj.shape[0]
        self.k, self.variant, self.seed = k, variant, seed
        self.expert_compute = False
        """True: ``forward`` computes only the selected experts (``forward_experts``); needs ``pack()``."""
        w = neuron_weights(self, spec)
        dev = w.w_out.device
        self.register_buffer("assignment", assignment.to(dev, torch.long), persistent=False)
        self.register_buffer("mu", mu.to(dev, torch.float32), persistent=False)
        self.register_buffer("router_proj", router_proj.to(dev, torch.float32), persistent=False)
        self.register_buffer("router_mix", router_mix.to(dev, torch.float32), persistent=False)
        self.register_buffer("expert_bias", expert_bias(w.w_out.detach(), self.mu, self.assignment, self.experts),
                             persistent=False)
        self.packed: Packed | None = None
        self._generator: torch.Generator | None = None

    @property
    def d_ff(self) -> int:
        return self.assignment.numel()

    def reset_random(self) -> None:
        """Restart the random router's stream (each evaluation of ``variant="random"`` then draws the same)."""
        self._generator = None

    def select(self, h: torch.Tensor) -> torch.Tensor:
        """Experts per token ``[n, k]`` for inputs ``h`` ``[n, d]``: the router's top k, or k random ones."""
        if self.variant == "random":
            if self._generator is None or self._generator.device != h.device:
                self._generator = torch.Generator(h.device).manual_seed(self.seed)
            scores = torch.rand(h.shape[0], self.experts, generator=self._generator, device=h.device)
        else:
            scores = router_logits(h, self.router_proj, self.router_mix)
        return scores.topk(self.k, dim=-1).indices

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        sel = self.select(h)
        if self.expert_compute:
            y = self.forward_experts(h, sel)
            y = y.reshape(*shape[:-1], y.shape[-1])
        else:  # the FFN's own linears see the input's own shape (hooks on them: W8A8, cushion errors)
            y = self.forward_masked(x, sel)
        if self.spec.residual:  # BLOOM's FFN adds the residual it is given (dropout is off in eval)
            y = y + (args[0] if args else kwargs["residual"])
        return y

    def forward_masked(self, h: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """Dense FFN, unselected neurons' activations replaced: ``h`` ``[..., d]`` (``n`` tokens in all), ``sel``
        ``[n, k]`` -> ``[..., d]``."""
        a = activation(self, self.spec, h)
        keep = torch.zeros(sel.shape[0], self.experts, dtype=torch.bool, device=h.device).scatter_(1, sel, True)
        keep = keep[:, self.assignment].reshape(a.shape)
        a = a * keep if self.variant == "zero" else torch.where(keep, a, self.mu.to(a.dtype))
        return getattr(self, self.spec.down)(a)

    @torch.no_grad()
    def pack(self) -> Packed:
        """Build (once) the expert-major copy of the weights that ``forward_experts`` multiplies."""
        if self.packed is not None:
            return self.packed
        w = neuron_weights(self, self.spec)
        order = expert_order(self.assignment)
        e = self.experts
        m = self.d_ff // e
        mp = math.ceil(m / PAD) * PAD

        def by_expert(rows: torch.Tensor) -> torch.Tensor:  # [d_ff, c] -> [E, mp, c], zero padded
            r = rows[order].reshape(e, m, -1)
            return F.pad(r, (0, 0, 0, mp - m)) if mp > m else r

        w_in = by_expert(w.w_in.detach())
        if w.w_up is not None:
            w_in = torch.cat([w_in, by_expert(w.w_up.detach())], dim=1)
        w_out = by_expert(w.w_out.detach().t()).transpose(1, 2)  # [E, d, mp]
        b_in = None if w.b_in is None else by_expert(w.b_in.detach()[:, None])[..., 0]
        dtype = w.w_out.dtype
        bias = self.expert_bias.to(dtype)
        self.packed = Packed(w_in.contiguous(), b_in, w_out.contiguous(), bias, self.expert_bias.sum(0).to(dtype), mp)
        return self.packed

    def unpack(self) -> None:
        self.packed = None

    def forward_experts(self, h: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """Only the selected experts computed: ``h`` ``[n, d]``, ``sel`` ``[n, k]`` -> ``[n, d]``."""
        p = self.pack()
        n, k = sel.shape
        flat = sel.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        experts = flat[order]
        tokens = torch.div(order, k, rounding_mode="floor")
        # tokens per expert without a host sync (bincount would read the maximum back): CUDA-graph capturable
        counts = torch.zeros(self.experts, dtype=torch.int32, device=h.device)
        offs = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        z = grouped_mm(h[tokens], p.w_in.transpose(1, 2), offs)  # [n*k, g*mp]
        act = getattr(self, self.spec.act)
        if self.spec.gated:
            gate, up = z.split(p.m, dim=-1)
            a = act(gate) * up
        else:
            a = act(z + p.b_in[experts] if p.b_in is not None else z)
        rows = grouped_mm(a, p.w_out.transpose(1, 2), offs)  # [n*k, d]
        if self.variant != "zero":
            rows = rows - p.bias[experts]
        y = h.new_zeros(n, rows.shape[-1]).index_add_(0, tokens, rows)
        if self.variant != "zero":
            y = y + p.bias_total
        b_out = getattr(getattr(self, self.spec.down), "bias", None)
        return y if b_out is None else y + b_out
