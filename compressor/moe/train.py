"""Fitting one block's router with a fresh, lean Lightning Trainer (the design card's shape).

Data: FFN inputs ``x`` ``[n, d]`` and targets ``s`` ``[n, E]`` (``stats.expert_targets``), already on the
training device; ``holdout`` of the tokens (seeded) choose the epoch kept: the one with the best
held-out recall of target mass in the router's top ``recall_top`` experts. Loss: BCE-with-logits
against ``s`` divided by the batch maximum (or per token: ``target_norm``); Adam. Source: G-MoEfication's router recipe
(algorithms.md section 5).
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

from compressor.moe.config import MoEConfig
from compressor.moe.module import Router
from compressor.moe.stats import normalise_targets, target_recall
from compressor.reconstruction.fit import quiet_lightning


class TokenBatches(IterableDataset):
    """Batches of rows of tensors that stay where they are (no collation), reshuffled each pass when ``shuffle``."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool, seed: int = 0):
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.tensors[0].shape[0] // self.batch_size)

    def __iter__(self):
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator).to(self.tensors[0].device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield tuple(t[start:start + self.batch_size] for t in self.tensors)
            else:
                idx = order[start:start + self.batch_size]
                yield tuple(t[idx] for t in self.tensors)


class RouterFit(LightningModule):
    """One router trained on ``(x, s)`` batches; keeps the state of its best held-out epoch."""

    def __init__(self, router: Router, lr: float, recall_top: float, target_norm: str = "batch"):
        super().__init__()
        self.router, self.lr, self.recall_top, self.target_norm = router, lr, recall_top, target_norm
        self.best_recall = -1.0
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.history: list[dict] = []
        self.losses: list[float] = []
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._loss_sum: torch.Tensor | None = None  # the epoch's summed batch losses (no per-step self.log: a
        self._loss_batches = 0                       # fifth of a step's time on these tiny routers)

    def training_step(self, batch, _):
        x, s = batch
        loss = F.binary_cross_entropy_with_logits(self.router(x), normalise_targets(s, self.target_norm))
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_batches += 1
        return loss

    def validation_step(self, batch, _):
        x, s = batch
        self._val.append((self.router(x).detach(), s))

    def on_validation_epoch_end(self):
        logits = torch.cat([v[0] for v in self._val])
        s = torch.cat([v[1] for v in self._val])
        self._val.clear()
        recall = target_recall(logits, s, self.recall_top)
        self.history.append({"epoch": self.current_epoch, "recall": recall})
        if recall > self.best_recall:
            self.best_recall, self.best_epoch = recall, self.current_epoch
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in self.router.state_dict().items()})

    def on_train_epoch_end(self):
        """The epoch's mean batch loss (one host sync per epoch)."""
        self.losses.append(float(self._loss_sum) / self._loss_batches)
        self._loss_sum, self._loss_batches = None, 0

    def configure_optimizers(self):
        return torch.optim.Adam(self.router.parameters(), lr=self.lr)


def split_holdout(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) row indices; at least one row each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    h = min(max(1, round(holdout * n)), n - 1)
    return perm[h:], perm[:h]


@torch.no_grad()
def recall_of(router: Router, x: torch.Tensor, s: torch.Tensor, top: float, batch: int = 8192) -> float:
    logits = torch.cat([router(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return target_recall(logits, s, top)


def fit_router(centroids: torch.Tensor, x: torch.Tensor, s: torch.Tensor, cfg: MoEConfig, accelerator: str = "auto",
               progress: bool = False) -> tuple[Router, dict]:
    """A router for one block: initialised from ``centroids`` ``[E, d]``, trained on ``x`` ``[n, d]`` -> ``s``
    ``[n, E]`` when ``cfg.train_router``. Returns the router (its best held-out epoch, on ``x``'s device) and
    ``{"seconds", "steps", "recall_init", "recall", "best_epoch", "history", "losses"}`` (recall on the held-out tokens;
    ``best_epoch`` -1: no epoch beat the initial router, which is kept)."""
    device = x.device
    train_idx, held_idx = split_holdout(x.shape[0], cfg.holdout, cfg.seed)
    train_idx, held_idx = train_idx.to(device), held_idx.to(device)
    xt, st, xh, sh = x[train_idx].float(), s[train_idx].float(), x[held_idx].float(), s[held_idx].float()
    router = Router(centroids).to(device)
    recall_init = recall_of(router, xh, sh, cfg.recall_top)
    info = {"seconds": 0.0, "steps": 0, "recall_init": recall_init, "recall": recall_init, "best_epoch": None,
            "history": [], "losses": []}
    if not cfg.train_router:
        return router, info
    train = TokenBatches((xt, st), cfg.batch_size, shuffle=True, seed=cfg.seed)
    held = TokenBatches((xh, sh), 8192, shuffle=False)
    module = RouterFit(router, cfg.lr, cfg.recall_top, cfg.target_norm)
    # the start competes too: training never leaves a router worse on held-out tokens than its centroid init
    module.best_recall, module.best_state = recall_init, {k: v.clone() for k, v in router.state_dict().items()}
    t = time.perf_counter()
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
        trainer = Trainer(max_epochs=cfg.epochs, accelerator=accelerator, devices=1, logger=False,
                          enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                          num_sanity_val_steps=0, log_every_n_steps=50)
        with torch.enable_grad():
            trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(held, batch_size=None))
    router.load_state_dict(module.best_state)
    router.to(device).requires_grad_(False)
    info.update(seconds=time.perf_counter() - t, steps=len(train) * cfg.epochs, recall=module.best_recall,
                best_epoch=module.best_epoch, history=module.history, losses=module.losses)
    return router, info
