"""G-MoEfication: dense FFNs into mixtures of experts with trained routers (Lee et al., EMNLP 2024).

Pure math in ``split`` (balanced k-means experts) and ``stats`` (mu, router targets, recall, bias tables);
the converted FFN in ``module``; router training in ``train``; the block walk in ``convert``; files in ``io``;
the run's step in ``run``.
"""

from compressor.moe.config import MoEConfig
from compressor.moe.io import attach_moe, detach_moe, generate, load_moe, save_moe, set_moe
from compressor.moe.module import MoEFFN, Router
from compressor.moe.run import run_moe

__all__ = ["MoEConfig", "MoEFFN", "Router", "attach_moe", "detach_moe", "generate", "load_moe", "run_moe", "save_moe",
           "set_moe"]
